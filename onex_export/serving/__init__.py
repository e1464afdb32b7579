"""Serving a build: ``onex-export serve`` (:mod:`.server`: Triton through PyTriton, loopback by default), the
inference callable that checks each request on its own (:mod:`.handler`), and the model file that runs in Triton's
Python stub so that a refusal reaches its client with its own status (:mod:`.triton_model`, never imported here)."""
from .handler import STAGES, BadRequest, OnexModel, PromptLimits
from .server import MODEL_NAME, ServeConfig, serve

__all__ = ["MODEL_NAME", "STAGES", "BadRequest", "OnexModel", "PromptLimits", "ServeConfig", "serve"]
