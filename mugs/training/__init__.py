"""Training engine: per-iteration schedules, optimizer and gradient handling, teacher EMA, the step."""
