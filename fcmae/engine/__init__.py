"""The training loop and its parts (arrows point down this list):

- ``state``: where a run is (:class:`LoopState`), how the loop runs (:class:`LoopSettings`), the
  blow-up rule (:class:`NonFiniteLoss`)
- ``signals``: stop signals -> a checkpoint at a step boundary (:class:`PreemptionGuard`, :class:`Preempted`)
- ``task``: the contract with the apps (:class:`Task`, :class:`RunParts`)
- ``step_sync``: what every rank agrees on after a step (signals, unreadable files, write failures)
- ``checkpointing``, ``step_log``: what the loop saves and when; what a step reports
- ``readback``: a step's loss, gradient norm and flags read on the host one step late
- ``loop``: :class:`TrainLoop`, which runs a step top to bottom and calls the parts
"""
from .loop import TrainLoop
from .signals import PREEMPT_SIGNALS, Preempted, PreemptionGuard
from .state import BLOWUP_FACTOR, LossDiverged, LoopSettings, LoopState, NonFiniteLoss
from .step_sync import DataQualityError
from .task import RunParts, Task, TaskContext

__all__ = ["BLOWUP_FACTOR", "DataQualityError", "LoopSettings", "LoopState", "LossDiverged", "NonFiniteLoss", "PREEMPT_SIGNALS",
           "Preempted", "PreemptionGuard", "RunParts", "Task", "TaskContext", "TrainLoop"]
