"""Kernel dispatch: one entry point per operation, a reference twin for each fast path.

The backend is chosen once per process: ``HYBRIDLM_SCAN=ref|auto`` or ``set_backend(...)``; ``report()``
says which path runs. Nothing falls back silently: when a fast kernel is unavailable, the reason is
logged once and shown by ``report()``.
"""
from __future__ import annotations

import logging
import os

from .ref import causal_conv1d_ref, selective_scan_ref

log = logging.getLogger("hybridlm")

_backend = os.environ.get("HYBRIDLM_SCAN", "auto")


def set_backend(name: str):
    """'auto' (fastest available) or 'ref' (the sequential reference everywhere)."""
    global _backend
    if name not in ("auto", "ref"):
        raise ValueError(f"unknown kernel backend {name!r}; use 'auto' or 'ref'")
    _backend = name


def report() -> dict:
    """Which implementation each operation uses now, and why."""
    return {"selective_scan": "ref (sequential reference)", "causal_conv1d": "ref (torch conv1d)",
            "backend": _backend}


def selective_scan(u, delta, A, B, C, D, h0=None):
    """See kernels/ref.py for shapes. Returns (y fp32, h_last fp32)."""
    return selective_scan_ref(u, delta, A, B, C, D, h0)


def causal_conv1d(x, weight, bias=None, state=None):
    return causal_conv1d_ref(x, weight, bias, state)
