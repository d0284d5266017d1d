"""Training: the driver (TorchTrainer from a spec) and what runs on each worker."""
