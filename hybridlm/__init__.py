"""hybridlm: hybrid Transformer-Mamba (Jamba-style) language models on ordinary machines."""
import os as _os
import sys as _sys

# OpenMP threads waiting at a barrier spin ~300,000 times before sleeping (libgomp's default). Beside another
# busy process that spinning takes the core the awaited thread needs: 2-thread training fell to 0.06x of its
# quiet speed beside another PyTorch job, prefill to 0.16x (benchmarks/contention.py). 1,000 spins keep
# 0.6-0.7x there for up to ~10% of the quiet training speed. libgomp reads this once, when torch loads it: set
# only if torch is not loaded yet and the user chose neither variable (kernels.report() says which applies).
OPENMP_SPINCOUNT = "1000"
openmp_spincount_set = ("torch" not in _sys.modules and "GOMP_SPINCOUNT" not in _os.environ
                        and "OMP_WAIT_POLICY" not in _os.environ)
if openmp_spincount_set:
    _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
from . import allocator as _allocator
_allocator.keep_heap()
from .config import PRESETS, HybridConfig, preset
from .model import HybridLM

__all__ = ["HybridLM", "HybridConfig", "PRESETS", "preset"]
__version__ = "0.1.0"
