"""Training machinery: phase configs (config), trainable masks (phases), the optimizer (optim),
Orbax checkpoints and the warm bridge (checkpoint)."""
