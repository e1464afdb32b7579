"""The one parity comparator, used by `build`, `verify` and the tests.

Errors per output: max and mean absolute error, relative error (max abs error over max |reference|,
so that near-zero elements do not blow it up) and cosine similarity. Tolerances live in one table,
per backend and precision; as in Polygraphy's comparator, a check may override them per output name
(:class:`Tolerances`). The reference is always the float32 PyTorch split model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None  # None: judged by relative error only
    max_rel: float
    min_cosine: float


# (backend, precision) -> tolerance. fp32 ONNX Runtime must match to 1e-4 absolute; half precisions
# are judged relative to the output's range (fp16 keeps ~3 decimal digits, bf16 ~2).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("onnxruntime", "fp32"): Tolerance(1e-4, 1e-4, 0.99999),
    ("onnxruntime", "fp16"): Tolerance(None, 2e-2, 0.999),
    ("aoti", "fp32"): Tolerance(1e-4, 1e-4, 0.99999),  # Inductor's CPU kernels: 2e-7 to 1.4e-6 max rel on tiny-sd3
    ("aoti", "fp16"): Tolerance(None, 2e-2, 0.999),
    ("tensorrt", "fp32"): Tolerance(None, 5e-3, 0.9999),  # wide enough for --tf32 builds (TF32 GEMMs)
    ("tensorrt", "fp16"): Tolerance(None, 2e-2, 0.999),
    ("tensorrt", "bf16"): Tolerance(None, 6e-2, 0.995),
}


def tolerance_for(backend: str, precision: str) -> Tolerance | None:
    """The tolerance of ``backend`` ("tensorrt-rtx" shares "tensorrt"'s), None if that pair cannot run."""
    return TOLERANCES.get(("tensorrt" if backend.startswith("tensorrt") else backend, precision))


@dataclass(frozen=True)
class Tolerances:
    """``default`` for every output, ``per_output`` (output name -> tolerance) where listed.

    Outputs accumulate error differently: in the SD3.5-Large fp16 TensorRT-RTX build
    (bench/results/build-sd35-large-fp16-tensorrt-rtx-cpu) every hidden state had a max rel error near 5e-4 while
    the cached deltas, differences of two hidden states with the same absolute error (2e-3) but a 10x smaller
    range, had 6.4e-3 and 6.8e-3. One bound for both is either loose for the hidden states or tight for the deltas.
    """

    default: Tolerance
    per_output: tuple[tuple[str, Tolerance], ...] = ()

    def __post_init__(self):
        names = [name for name, _ in self.per_output]
        if len(set(names)) != len(names):
            raise ValueError(f"an output is listed twice in the per-output tolerances: {names}")

    @classmethod
    def with_max_rel(cls, default: Tolerance, max_rel: dict[str, float]) -> "Tolerances":
        """``default``, except that each output named in ``max_rel`` is judged by relative error (at most its
        value) and cosine only: the form of ``--tolerance OUTPUT=MAX_REL``."""
        return cls(default, tuple((name, replace(default, max_abs=None, max_rel=value))
                                  for name, value in sorted(max_rel.items())))

    def of(self, output: str) -> Tolerance:
        return dict(self.per_output).get(output, self.default)


@dataclass(frozen=True)
class OutputError:
    case: str
    output: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    passed: bool


def compare(case: str, reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor],
            tolerances: Tolerance | Tolerances) -> list[OutputError]:
    """One row per output of ``reference``; a missing, misshapen or non-finite output fails. Each output is judged
    by its own tolerance when ``tolerances`` names it, by the default otherwise."""
    if isinstance(tolerances, Tolerance):
        tolerances = Tolerances(tolerances)
    rows = []
    for name, ref in reference.items():
        tol = tolerances.of(name)
        got = candidate.get(name)
        if got is None or tuple(got.shape) != tuple(ref.shape):
            rows.append(OutputError(case, name, float("inf"), float("inf"), float("inf"), 0.0, False))
            continue
        ref64, got64 = ref.detach().double().cpu(), got.detach().double().cpu()
        diff = (got64 - ref64).abs()
        max_abs = float(diff.max())
        max_rel = max_abs / max(float(ref64.abs().max()), 1e-12)
        cosine = float(torch.nn.functional.cosine_similarity(got64.flatten(), ref64.flatten(), dim=0))
        ok = bool(torch.isfinite(got64).all()) and max_rel <= tol.max_rel and cosine >= tol.min_cosine
        if tol.max_abs is not None:
            ok = ok and max_abs <= tol.max_abs
        rows.append(OutputError(case, name, max_abs, float(diff.mean()), max_rel, cosine, ok))
    return rows


def format_table(rows: list[OutputError]) -> str:
    """A per-output table, one line per row."""
    head = f"{'case':34s} {'output':22s} {'max abs':>10s} {'mean abs':>10s} {'max rel':>10s} {'cosine':>10s}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case:34s} {r.output:22s} {r.max_abs:10.3e} {r.mean_abs:10.3e} {r.max_rel:10.3e} "
                     f"{r.cosine:10.7f}  {'ok' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def rows_to_json(rows: list[OutputError]) -> list[dict]:
    return [asdict(r) for r in rows]
