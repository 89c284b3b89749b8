"""Training pipeline: datasets, feature cache, training loop, evaluation, export and publishing."""
