"""Training recipes: one readable loop per file (lora; later dpo, distill, pretrain_micro)."""
