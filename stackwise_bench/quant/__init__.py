"""Low precision beyond autocast: FP8 training layers (torchao) and FP8 post-training quantization."""
