"""Training components: optimizer and LR schedule, loss, metrics."""
