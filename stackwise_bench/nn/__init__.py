"""Networks: the model factory (timm and the CIFAR ResNets), LoRA through peft, heads, state dicts."""
