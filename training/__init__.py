"""The machinery that train.py calls: config, schedule, checkpoints, metrics, param groups."""
