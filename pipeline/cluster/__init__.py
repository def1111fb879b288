"""Running on Ray: the training loop, Ray Train, Ray Tune, work in chunks on Ray Data."""
