"""Training: label assignment, losses, augmentation and the loop (train.py; later quantization-aware fine-tuning)."""
