"""Training: the fine-tuning loop, its data and losses, checkpoint writing and resume (adapters are model code: ``tbps.models.adapters``)."""
