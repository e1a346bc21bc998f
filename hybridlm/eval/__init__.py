"""Evaluation: synthetic in-context tasks (``tasks``) and the ablation sweep (``ablate``)."""
from .tasks import MQAR, Batch, InductionCopy, Passkey, Vocab, make_task

__all__ = ["MQAR", "Batch", "InductionCopy", "Passkey", "Vocab", "make_task"]
