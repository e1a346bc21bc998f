"""hybridlm: hybrid Transformer-Mamba (Jamba-style) language models on ordinary machines."""
from .config import PRESETS, HybridConfig, preset
from .model import HybridLM

__all__ = ["HybridLM", "HybridConfig", "PRESETS", "preset"]
__version__ = "0.1.0"
