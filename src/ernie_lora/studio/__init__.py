"""The studio: the whole LoRA workflow in a browser, on the recipes the CLI runs (``ernie-lora studio``)."""
