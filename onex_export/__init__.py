"""onex-export: 1.x-Distill SD3/SD3.5 models from PyTorch to TensorRT engines."""
from .config import SkipRange
from .errors import OnexError
from .schedule import SamplingPlan

__version__ = "0.1.0"
__all__ = ["SkipRange", "OnexError", "SamplingPlan", "__version__"]
