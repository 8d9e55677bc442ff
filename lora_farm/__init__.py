"""lora-farm: a multi-GPU batch LoRA training farm with a job queue."""

__version__ = "0.1.0"
