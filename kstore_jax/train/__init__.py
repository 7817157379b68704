"""Training: mesh and sharding, optimizer, steps, loop, checkpoints, metrics."""
