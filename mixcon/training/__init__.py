"""Training: the loop, optimizer and schedule, checkpoints, metrics, and DDP / FSDP2 parallelism."""

from mixcon.training.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint
from mixcon.training.trainer import NonFiniteLossError, RunSummary, Trainer, TrainOptions

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NonFiniteLossError",
    "RunSummary",
    "TrainOptions",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint",
]
