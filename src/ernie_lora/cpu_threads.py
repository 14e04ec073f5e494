"""How many threads torch uses on a CPU: one for small models, so that a second process cannot stall them.

With two intra-op threads per process on a machine whose cores another process also uses, every small
op waits at its barrier for a thread that is not scheduled: a 60-step micro run took 10x its idle time
beside a second torch process (bench/busy_machine.py). A small model's ops are too short for a second
thread to pay for that risk, so below ``SMALL_DIT_PARAMETERS`` a CPU run uses one thread; larger models
keep torch's default (one per core). ``OMP_NUM_THREADS`` or ``ERNIE_LORA_THREADS``, when set, win.
"""

from __future__ import annotations

import os
import sys

import torch

from .errors import UserError

SMALL_DIT_PARAMETERS = 50_000_000  # micro's blocks hold ~1M, the 8B's ~7.8G


def choose_cpu_threads(block_parameters: int, device: torch.device | str) -> int:
    """Set and return torch's intra-op thread count for a model of ``block_parameters`` on ``device``."""
    wanted = os.environ.get("ERNIE_LORA_THREADS")
    if wanted:
        try:
            count = int(wanted)
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"ERNIE_LORA_THREADS: {wanted!r} must be a whole number >= 1")
        torch.set_num_threads(count)
    elif torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if block_parameters < SMALL_DIT_PARAMETERS:
            torch.set_num_threads(1)
    return torch.get_num_threads()


def pick_cpu_threads(model: str, revision: str | None, device: torch.device | str, announce: bool = True) -> int:
    """``choose_cpu_threads`` for a model by name (its config says its size); a line on stderr (stdout may be
    JSON progress) when it changes anything."""
    from .models import family_for  # models loads diffusers: only once a model is about to run

    before = torch.get_num_threads()
    try:
        parameters = family_for(model).block_parameters(model, revision)
    except UserError:
        return before  # a model whose config cannot be read: loading it says why
    threads = choose_cpu_threads(parameters, device)
    if announce and threads != before:
        print(f"cpu threads: {threads} (was {before}): a small model, which a second process on these cores "
              "cannot stall; ERNIE_LORA_THREADS chooses", file=sys.stderr, flush=True)
    return threads
