"""Evaluation: synthetic in-context tasks (``tasks``), the ablation sweep (``ablate``), and perplexity and
agreement with a reference model on held-out text (``quality``)."""
from .tasks import MQAR, Batch, InductionCopy, Passkey, Vocab, make_task

__all__ = ["MQAR", "Batch", "InductionCopy", "Passkey", "Vocab", "make_task"]
