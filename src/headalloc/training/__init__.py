"""Training and sweeps: the trainer, run functions, and the resumable sweep store with local/Ray executors."""

from headalloc.training.sweep import SweepStore, run_sweep
from headalloc.training.trainer import NonFiniteLossError, TrainConfig, train

__all__ = ["NonFiniteLossError", "SweepStore", "TrainConfig", "run_sweep", "train"]
