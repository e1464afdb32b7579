"""The split SD3 transformer, the compensation MLP, and the embedded tiny models."""
from .compensation import CompensationMLP, DeltaMLP, load_compensation, save_compensation
from .split import SplitSD3Transformer
from .zoo import DEFAULT_MODEL, TINY_MODELS, build_tiny, load_transformer

__all__ = [
    "CompensationMLP", "DeltaMLP", "load_compensation", "save_compensation", "SplitSD3Transformer",
    "DEFAULT_MODEL", "TINY_MODELS", "build_tiny", "load_transformer",
]
