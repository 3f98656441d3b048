"""The eval suite: reads exported checkpoints (model.safetensors + config.json) only, never the trainer."""
