"""Models by name: the registry, the MLP/CNN/ResNet builders, torchvision's zoo, the Network they return."""
