"""`onex-export probe`: which block range can step two skip, measured (see :mod:`.measure` for the math)."""
from .measure import DEFAULT_NFES, NORMALISATION, ProbeResult, candidate_ranges, probe, skipped_for, trace
from .run import DEFAULT_PROMPTS, ProbeConfig, calibration_prompts, read_prompts, run

__all__ = ["DEFAULT_NFES", "DEFAULT_PROMPTS", "NORMALISATION", "ProbeConfig", "ProbeResult", "calibration_prompts", "candidate_ranges",
           "probe", "read_prompts", "run", "skipped_for", "trace"]
