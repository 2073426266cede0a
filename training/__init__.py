"""Training stage: the ResNet family and plain twins, data, augmentation, the training loop,
checkpoint import and evaluation. The only stage that needs autograd."""
