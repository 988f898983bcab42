"""Configuration, training loop, checkpoints, evaluation and the demo."""
