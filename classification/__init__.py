"""Classification training for rwdet backbones (ImageNet layout, DDP, embedded Fashion-MNIST)."""
