"""The engine: DeepSpeed, the step loop, schedules, optimizers, monitors and the run lock."""
