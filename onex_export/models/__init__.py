"""The split SD3 transformer, the compensation MLP, the embedded tiny models and weight loading."""
from .compensation import CompensationMLP, DeltaMLP, load_compensation, save_compensation
from .split import SplitSD3Transformer
from .weights import load_transformer
from .zoo import DEFAULT_MODEL, TINY_MODELS, build_tiny

__all__ = [
    "CompensationMLP", "DeltaMLP", "load_compensation", "save_compensation", "SplitSD3Transformer",
    "DEFAULT_MODEL", "TINY_MODELS", "build_tiny", "load_transformer",
]
