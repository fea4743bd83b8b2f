"""Training: WoRA/DoRA/LoRA adapters and the fine-tuning loop."""
