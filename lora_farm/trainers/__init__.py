"""Trainer processes: one LoRA training per process (heavy imports live only here)."""
