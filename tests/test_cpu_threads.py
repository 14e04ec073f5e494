"""The CPU thread policy: one thread for small models unless the user chose."""

import pytest
import torch

from ernie_lora.cpu_threads import SMALL_DIT_PARAMETERS, choose_cpu_threads, pick_cpu_threads
from ernie_lora.errors import UserError
from ernie_lora.models import ERNIE_IMAGE


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ERNIE_LORA_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield monkeypatch
    torch.set_num_threads(before)


def test_a_small_model_on_a_cpu_runs_on_one_thread(threads):
    assert choose_cpu_threads(SMALL_DIT_PARAMETERS - 1, "cpu") == 1 == torch.get_num_threads()


def test_a_large_model_or_a_gpu_keeps_torchs_threads(threads):
    assert choose_cpu_threads(SMALL_DIT_PARAMETERS, "cpu") == 2
    assert choose_cpu_threads(1000, "cuda") == 2  # the CPU only feeds the GPU there: nothing to choose


def test_the_users_choice_wins(threads):
    threads.setenv("OMP_NUM_THREADS", "2")
    assert choose_cpu_threads(1000, "cpu") == 2
    threads.setenv("ERNIE_LORA_THREADS", "3")
    assert choose_cpu_threads(1000, "cpu") == 3
    threads.setenv("ERNIE_LORA_THREADS", "many")
    with pytest.raises(UserError, match="ERNIE_LORA_THREADS: 'many' must be a whole number >= 1"):
        choose_cpu_threads(1000, "cpu")


def test_models_are_sized_from_their_config(threads, capsys):
    assert ERNIE_IMAGE.block_parameters("micro") < SMALL_DIT_PARAMETERS
    assert ERNIE_IMAGE.block_parameters(ERNIE_IMAGE.hub_id) > 7e9  # 36 blocks of the 8B, no download
    assert pick_cpu_threads("micro", None, "cpu") == 1
    assert "cpu threads: 1 (was 2)" in capsys.readouterr().err
    torch.set_num_threads(2)
    assert pick_cpu_threads(ERNIE_IMAGE.hub_id, None, "cpu") == 2
