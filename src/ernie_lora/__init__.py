"""ernie-lora: LoRA training, alignment, distillation and inference for Baidu's ERNIE-Image."""

__version__ = "0.1.0"
