"""Layer-wise distillation: learned rounding, scales and biases for every weight format (docs/distill.md)."""
