"""The parts of the captioner trainer: data streams, augmentation, checkpoints, validation, ranks."""
