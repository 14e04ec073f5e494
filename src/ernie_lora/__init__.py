"""ernie-lora: LoRA training, alignment, distillation and inference for Baidu's ERNIE-Image."""

import logging as _logging

__version__ = "0.1.0"

# With torchao installed (quantised bases), importing diffusers logs harmless noise through these
# loggers on every command: prebuilt kernels for other CUDA/Python versions, a deprecated pytree call.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
