"""The training loop (Algorithm 1 with its checkpoints, EMA and divergence guard) and what a sweep
trial measures, without Ray: `pipeline.cluster` runs both on Ray Train and Ray Tune."""
