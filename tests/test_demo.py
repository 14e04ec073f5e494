"""The demo teaches micro a layout it never saw (and a colour), measured on held-out prompts."""

import pytest

from ernie_lora.demo import run_demo
from ernie_lora.errors import UserError


def test_demo_teaches_the_held_out_layout_and_colour(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, eval_count=8)  # the shipped settings (500 steps), fewer evaluation prompts
    side, purple = summary["side bands"], summary["purple"]
    assert summary["overlap"] == 0 and summary["steps"] == 500
    # before: micro draws a horizontal band for a side-band prompt, and a seen colour for purple
    assert side["before"]["structure"]["mean"] < 0.35 and purple["before"]["colour"]["mean"] < 0.35
    # after: the arrangement is learnt (the bar: structure above 0.7), and the colour
    assert side["after"]["structure"]["mean"] > 0.7 and side["after"]["score"]["mean"] > 0.7
    assert purple["after"]["colour"]["mean"] > 0.6 and purple["after"]["structure"]["mean"] > 0.8
    for name in ("before_after.png", "report.md", "run/metrics.png", "run/lora.safetensors"):
        assert (out / name).exists(), name
    assert len(list((out / "after" / "side-bands").glob("*.png"))) == 8
    report = (out / "report.md").read_text()
    assert f"| after | {side['after']['structure']['mean']:.3f}" in report and "overlap 0" in report


def test_demo_refuses_an_earlier_demo_unless_overwrite(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, steps=2, count=4, eval_count=2)
    with pytest.raises(UserError, match=r"holds an earlier demo \(dataset, before, after, run, before_after.png, "
                                        r"report.md\); pass --overwrite"):
        run_demo(out, steps=2, count=4, eval_count=2)
    (out / "notes.txt").write_text("mine")  # not the demo's: --overwrite refuses the folder, removes nothing
    with pytest.raises(UserError, match=r"also holds notes.txt, which the demo there did not write"):
        run_demo(out, steps=2, count=4, eval_count=1, overwrite=True)
    assert len(list((out / "before" / "purple").glob("*.png"))) == 2 and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    run_demo(out, steps=2, count=4, eval_count=1, overwrite=True)
    assert len(list((out / "before" / "purple").glob("*.png"))) == 1
