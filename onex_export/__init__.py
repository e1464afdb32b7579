"""onex-export: 1.x-Distill SD3/SD3.5 models from PyTorch to TensorRT engines."""
from .config import SkipRange
from .errors import OnexError
from .schedule import SamplingPlan

__version__ = "0.1.0"
__all__ = ["SkipRange", "OnexError", "SamplingPlan", "BuildPipeline", "Generation", "Request", "__version__"]


def __getattr__(name: str):
    """The runtime's public classes, imported on first use (``import onex_export`` stays light)."""
    if name in ("BuildPipeline", "Generation", "Request"):
        from .runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'onex_export' has no attribute {name!r}")
