"""Training: the loop, its runtime (device, precision, seed), checkpoints, optimizers, metrics, monitors."""
