"""Training: checkpoints now; mesh, optimizer, schedules and the train loop as they land."""
