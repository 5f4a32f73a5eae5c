"""Training on top of the layer API: models, losses, optimizers, data, checkpoints.

Everything here runs with explicit forward and backward passes on the
model's device (NumPy arrays on the CPU, CuPy arrays with the CUDA backend).
``kernrnn train`` (:mod:`kernrnn.cli.train`) is the command-line front end.
"""

from kernrnn.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from kernrnn.train.data import (
                                AddingTask,
                                CharLMTask,
                                CopyTask,
                                ForecastTask,
                                make_task,
                                read_csv_series,
                                task_from_config,
)
from kernrnn.train.loop import StepResult, Trainer, predict, train_batch
from kernrnn.train.losses import cross_entropy_loss, length_mask, mse_loss
from kernrnn.train.model import SequenceModel
from kernrnn.train.optim import SGD, Adam, AdamW, clip_grad_norm, global_norm, make_optimizer

__all__ = [
    "SequenceModel", "mse_loss", "cross_entropy_loss", "length_mask",
    "SGD", "Adam", "AdamW", "clip_grad_norm", "global_norm", "make_optimizer",
    "train_batch", "predict", "Trainer", "StepResult",
    "ForecastTask", "CharLMTask", "AddingTask", "CopyTask", "make_task", "task_from_config",
    "read_csv_series", "Checkpoint", "save_checkpoint", "load_checkpoint",
]
