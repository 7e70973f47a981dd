"""L4 — learning Q, K and V from scratch: synthetic lookup tasks, a training loop, experiments."""

from .loop import StepInfo, TrainConfig, TrainResult, build_model, evaluate, train
from .tasks import IGNORE, TASKS, Batch, CopyTask, InductionTask, RecallTask, Task, make_task

__all__ = [
    "IGNORE",
    "TASKS",
    "Batch",
    "CopyTask",
    "InductionTask",
    "RecallTask",
    "StepInfo",
    "Task",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "make_task",
    "train",
]
