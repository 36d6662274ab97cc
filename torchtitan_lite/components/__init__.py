"""Training components: optimizer and LR schedule, checkpoints, metrics, the startup
banner, profiling, stop signals, scheduled garbage collection."""
