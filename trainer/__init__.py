"""The training half: mining, datasets, LoRA training, GGUF export and evaluation."""
