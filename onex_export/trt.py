"""Which TensorRT flavour: import it, its version, install hints. Used by both the engine builder
(:mod:`onex_export.export.tensorrt`) and the engine runner (:mod:`onex_export.runtime.tensorrt_runner`),
so that running an engine never imports the builder.

Both flavours share one API: full TensorRT (``tensorrt``) and TensorRT-RTX (``tensorrt_rtx_bindings``,
whose shared libraries ``tensorrt_rtx_libs`` loads first).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import OnexError, UsageError

FLAVOURS = ("tensorrt", "tensorrt-rtx")

_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx_libs", "tensorrt_rtx_bindings")}
LABELS = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
INSTALL_HINTS = {
    "tensorrt-rtx": "pip install -e '.[tensorrt-rtx]' "
    "(tensorrt-rtx-cu13-bindings==1.7.1.116 tensorrt-rtx-cu13-libs==1.7.1.116)",
    "tensorrt": "pip install -e '.[tensorrt]' (tensorrt-cu13-bindings==11.4.0.106 tensorrt-cu13-libs==11.4.0.106; "
    "its libs package downloads from NVIDIA, so it needs a normal network)",
}


class FlavourNotInstalledError(OnexError):
    """The Python module for the chosen TensorRT flavour cannot be imported."""


class EngineOptionsError(UsageError):
    """An engine build option (flavour, level, compute capability, cache, workspace) is invalid."""


def check_flavour(flavour: str) -> None:
    """Raise :class:`EngineOptionsError` unless ``flavour`` is one of :data:`FLAVOURS`."""
    if flavour not in FLAVOURS:
        raise EngineOptionsError(f"unknown TensorRT flavour {flavour!r}", hint=f"choose one of {', '.join(FLAVOURS)}")


def load_trt(flavour: str) -> ModuleType:
    """Import and return the TensorRT module for ``flavour`` (``tensorrt_rtx_bindings`` for "tensorrt-rtx")."""
    check_flavour(flavour)
    try:
        return [importlib.import_module(name) for name in _MODULES[flavour]][-1]
    except (ImportError, OSError) as exc:
        raise FlavourNotInstalledError(
            f"{LABELS[flavour]} is not installed or cannot be loaded ({exc})",
            hint=f"{INSTALL_HINTS[flavour]}; or pass --trt none to export ONNX only",
        ) from exc


def flavour_version(flavour: str) -> str | None:
    """The installed version of ``flavour``, or None when it is not installed."""
    try:
        return load_trt(flavour).__version__
    except FlavourNotInstalledError:
        return None
