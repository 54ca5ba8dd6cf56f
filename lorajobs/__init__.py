"""lorajobs: a self-hosted REST service that runs LoRA fine-tuning jobs."""
