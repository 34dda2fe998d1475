"""Training: entrypoint, loop, sharding, input pipelines, checkpoints and metrics."""
