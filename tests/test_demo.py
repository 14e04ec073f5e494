from ernie_lora.demo import run_demo


def test_demo_writes_grid_loss_plot_and_report(tmp_path):
    summary = run_demo(tmp_path / "demo", steps=20, count=12, eval_count=4)
    out = tmp_path / "demo"
    for name in ("before_after.png", "report.md", "run/metrics.png", "run/lora.safetensors"):
        assert (out / name).exists(), name
    assert len(list((out / "before").glob("*.png"))) == 4 and len(list((out / "after").glob("*.png"))) == 4
    report = (out / "report.md").read_text()
    assert f"{summary['before_median']:.3f}" in report and f"{summary['after_median']:.3f}" in report
    assert 0.0 <= summary["before_median"] <= 1.0 and summary["steps"] == 20
    # a second run rewrites the demo's own subfolders instead of piling up images
    run_demo(tmp_path / "demo", steps=2, count=4, eval_count=2)
    assert len(list((out / "before").glob("*.png"))) == 2
