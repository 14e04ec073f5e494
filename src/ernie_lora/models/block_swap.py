"""Block swap: the frozen weights of N transformer blocks live in (pinned) CPU memory and are copied to
the GPU only while that block computes, so the 8B base trains on GPUs smaller than its weights.

Why not diffusers' group offloading: it is made for inference. It moves *every* parameter of a block,
the trainable LoRA included (the optimizer then finds weights and gradients on different devices), and
with streams it restores the CPU copy taken at set-up, which would undo every LoRA update.

When a block's weights must be on the device:
- its forward (pre-hook loads, post-hook parks them again);
- its backward. Autograd keeps the weight *parameter* it saved, not a copy, so parking swaps the data
  underneath it. A hook on the block's output gradient loads the weights just before the block's
  backward, and a hook on its input gradient parks them once that backward is done.
- with gradient checkpointing the block's forward re-runs inside backward; that re-run keeps the
  weights loaded (the input-gradient hook parks them afterwards).
The trainable parameters (LoRA) never move. At most two blocks' copies are on the device at once.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers (RoPE tables and the like) to ``device``, parameters left where they are."""
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Installs the hooks on ``transformer.layers[-count:]``; the rest of the model goes to ``device``."""

    def __init__(self, transformer: torch.nn.Module, count: int, device: torch.device | str):
        blocks = list(transformer.layers)
        if not 0 < count <= len(blocks):
            raise UserError(f"model.block_swap: {count} is not between 1 and the model's {len(blocks)} blocks")
        self.device = torch.device(device)
        self.blocks = blocks[len(blocks) - count:]
        self.loads = 0  # copies to the device, counted for tests and the benchmark
        pin = self.device.type == "cuda"
        self._masters: list[dict[torch.nn.Parameter, torch.Tensor]] = []
        swapped = set()
        for block in self.blocks:
            masters = {}
            for p in block.parameters():
                if p.requires_grad:
                    continue
                if type(p.data) is not torch.Tensor:  # torchao's quantised weights are tensor subclasses
                    raise UserError("model.block_swap: not supported with model.quantize yet; use quantize: none")
                master = p.data.detach().to("cpu")
                masters[p] = master.pin_memory() if pin else master
                swapped.add(p)
            self._masters.append(masters)
        for p in transformer.parameters():
            if p not in swapped:
                p.data = p.data.to(self.device)
        move_buffers(transformer, self.device)
        self._loaded = [False] * len(self.blocks)
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._park(i)
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._load(i)))
            self._handles.append(block.register_forward_hook(lambda m, a, out, i=i: self._after_forward(i, a, out)))

    def parked(self, master: torch.Tensor) -> torch.Tensor:
        """What a parked parameter holds: its CPU master. (Tests return poison here to catch a late load.)"""
        return master

    @torch.compiler.disable  # data swaps under a regionally compiled block run eagerly
    def _load(self, i: int) -> None:
        if self._loaded[i]:
            return  # checkpointing's re-run after the output-gradient hook loaded it
        for p, master in self._masters[i].items():
            # copy=True: on a CPU "device" the copy still proves that parked data is never computed with
            p.data = master.to(self.device, non_blocking=True, copy=True)
        self._loaded[i] = True
        self.loads += 1

    @torch.compiler.disable
    def _park(self, i: int) -> None:
        for p, master in self._masters[i].items():
            p.data = self.parked(master)
        self._loaded[i] = False

    @torch.compiler.disable
    def _after_forward(self, i: int, args: tuple, output) -> None:
        if _in_backward():
            return  # checkpointing's re-run: the block's backward comes next and needs the weights
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._load(i) or grad)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda grad: self._park(i) or grad)
        self._park(i)

    def park_all(self) -> None:
        """Park every block (after backward: a block whose input needs no gradient has no hook to do it)."""
        for i in range(len(self.blocks)):
            self._park(i)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for i in range(len(self.blocks)):
            for p, master in self._masters[i].items():
                p.data = master.to(self.device)

    def block_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for masters in self._masters for m in masters.values())
