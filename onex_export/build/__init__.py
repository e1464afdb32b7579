"""`onex-export build`, the top of the library: load -> plan -> export -> engines -> gate -> manifest (run.py)."""
from .run import TRT_CHOICES, BuildConfig, ParityFailedError, build, check_text_len

__all__ = ["TRT_CHOICES", "BuildConfig", "ParityFailedError", "build", "check_text_len"]
