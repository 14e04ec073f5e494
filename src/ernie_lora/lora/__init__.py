"""LoRA adapters and LoRA files.

- ``files``: safetensors reading and writing, the header and its tensor hash;
- ``modules``: the in-memory form of every layout (LoRA, DoRA, LoHa, LoKr, full deltas), exact apply, SVD;
- ``layouts``: the key layouts and each loader's rule (diffusers, ComfyUI, peft, kohya);
- ``formats``: read any layout, write ours with alpha / rank folded in;
- ``adapters``: peft adapters on the DiT (training, resume, export);
- ``tools``: info, verify, convert, merge, fuse.

Import from the submodule you need: only ``adapters`` loads peft.
"""
