"""Block swap: the frozen weights of swapped blocks are on the device exactly when they are computed with."""

import pytest
import torch

from conftest import tiny_config
from ernie_lora.lora.adapters import add_lora, resolve_targets
from ernie_lora.lora.files import read_lora
from ernie_lora.models import ERNIE_IMAGE
from ernie_lora.models.block_swap import BlockSwap
from ernie_lora.plan import Profiles, Settings, estimate, measure_step, training_step
from ernie_lora.recipes.lora import train
from test_plan import SMALL_DIT, _cfg, _lora_model


class PoisonedSwap(BlockSwap):
    """Parked weights are NaN: any computation that reads a parked block poisons the gradients."""

    def parked(self, master: torch.Tensor) -> torch.Tensor:
        return torch.full_like(master, float("nan"))


def _model(checkpointing: bool):
    torch.manual_seed(0)
    model = ERNIE_IMAGE.load_transformer("tiny", dtype="fp32")
    add_lora(model, 4, 8.0, resolve_targets(model, "attn_mlp"))
    with torch.no_grad():  # LoRA B starts at zero; non-zero makes every LoRA gradient informative
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    training_step(model, 8, 4, 2, autocast=False)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_swapped_blocks_give_the_same_gradients_and_are_parked_after(checkpointing):
    reference = _grads(_model(checkpointing))
    model = _model(checkpointing)
    swap = PoisonedSwap(model, len(model.layers), "cpu")
    lora_before = {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    grads = _grads(model)
    for name, g in reference.items():
        assert torch.equal(grads[name], g), name  # no NaN: no parked weight was read, forward or backward
    assert swap.loads == 2 * len(model.layers)  # each block: once for its forward, once for its backward
    swap.park_all()
    for block in model.layers:
        frozen = [p for p in block.parameters() if not p.requires_grad]
        assert frozen and all(torch.isnan(p).all() for p in frozen)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad} == lora_before  # LoRA stays


def test_a_hook_that_parks_too_early_is_caught():
    """The poison test can fail: parking right after forward, with no reload for backward, reads NaN."""

    class ParksAfterForward(PoisonedSwap):
        def _after_forward(self, i, args, output):
            self._park(i)

    model = _model(checkpointing=False)
    ParksAfterForward(model, len(model.layers), "cpu")
    assert any(torch.isnan(g).any() for g in _grads(model).values())


def test_inference_loads_each_block_once():
    model = _model(checkpointing=False).eval()
    x = torch.randn(1, model.config.in_channels, 8, 8)
    kwargs = dict(timestep=torch.tensor([500.0]), text_bth=torch.randn(1, 4, model.config.text_in_dim),
                  text_lens=torch.tensor([4]), return_dict=False)
    with torch.no_grad():
        expected = model(hidden_states=x, **kwargs)[0]
        swap = PoisonedSwap(model, 1, "cpu")
        got = model(hidden_states=x, **kwargs)[0]
    assert torch.equal(got, expected) and swap.loads == 1


def test_planned_block_swap_matches_the_measured_step():
    """Planned activations + two blocks' copies against a measured step with every block swapped."""
    cfg = _cfg("bf16", "bf16")
    side = 48
    plan = estimate(cfg, Settings("none", True, "adamw", 1, side * 16, block_swap=4), Profiles(cfg, SMALL_DIT),
                    SMALL_DIT, 64, 16)
    rows = dict(plan.rows)
    planned = sum(b for name, b in rows.items() if name.startswith(("activations", "block swap")))
    planned += sum(p.numel() * 4 for p in _lora_model(cfg).parameters() if p.requires_grad)
    measured = measure_step(cfg, SMALL_DIT, side, 64, checkpointing=True, block_swap=4)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)
    assert next(b for name, b in rows.items() if name.startswith("frozen")) < 0.2 * sum(
        p.numel() * 2 for p in _lora_model(cfg).parameters() if not p.requires_grad)


def test_block_swap_needs_an_unquantized_base():
    from ernie_lora.config import TrainRunConfig

    with pytest.raises(ValueError, match="block_swap"):
        TrainRunConfig.model_validate({"model": {"quantize": "int8", "block_swap": 4}})


def test_training_with_block_swap_equals_training_without(poster_dataset, tmp_path):
    plain = train(tiny_config(poster_dataset, tmp_path / "cache"), tmp_path / "plain", progress=False)
    swapped = train(tiny_config(poster_dataset, tmp_path / "cache", model={"block_swap": 2},
                                train={"gradient_checkpointing": True}), tmp_path / "swapped", progress=False)
    a, _ = read_lora(plain.output / "lora.safetensors")
    b, _ = read_lora(swapped.output / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
