"""The inference callable behind model ``onex``: a batch of Triton requests -> one answer each.

Each request is checked on its own before any image is made, so a bad request is refused alone and the good
ones batched with it are answered. A refusal is a response with one output, ``error``, holding a status and a
message; the model file that runs in Triton's Python stub (:mod:`.triton_model`) turns it into Triton's own
error with that status: ``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT) for a client's mistake,
``UNAVAILABLE`` (HTTP 503, gRPC UNAVAILABLE) for a server that is stopping. A fault of the server (an
exception while generating) still fails its whole call as Triton's INTERNAL (HTTP 500): that one is ours.
"""
from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..runtime.pipeline import BuildPipeline, Request

STAGES = ("tokenize", "text", "transformer", "vae")
ERROR_OUTPUT = "error"  # the output a refusal carries; never reaches a client as data
INVALID_ARG, UNAVAILABLE = "INVALID_ARG", "UNAVAILABLE"  # pb_utils.TritonError's names for the two statuses


class BadRequest(ValueError):
    """A request the build cannot serve (a client's mistake); its message goes back to the client."""


@dataclass(frozen=True)
class PromptLimits:
    """How much text one prompt may carry. Text past the encoders' token limits is cut (and the client told),
    but it must be read first: a 1 MB prompt took 13-15 s to tokenize, holding up every request behind it."""

    max_chars: int = 2000

    def __post_init__(self) -> None:
        if not 1 <= self.max_chars <= 1_000_000:
            raise UsageError(f"the prompt limit must be 1-1000000 characters, got {self.max_chars}")

    @property
    def max_bytes(self) -> int:  # UTF-8 takes at most 4 bytes per character: checked before decoding
        return 4 * self.max_chars


def refusal(status: str, message: str) -> dict[str, np.ndarray]:
    """A response that :mod:`.triton_model` sends to the client as an error with ``status``."""
    return {ERROR_OUTPUT: np.array([[f"{status}\n{message}".encode()]], dtype=object)}


def _column(request, name: str, dtype, rows: int) -> np.ndarray | None:
    """Input ``name`` of a request as a (rows,) array, or None when the client left it out."""
    if name not in request:
        return None
    array = np.asarray(request[name])
    if array.shape != (rows, 1):
        raise BadRequest(f"input {name!r} has shape {list(array.shape)}; it needs [{rows}, 1] (one value per prompt)")
    return array[:, 0].astype(dtype) if dtype is not None else array[:, 0]


def _one(values: np.ndarray | None, name: str) -> int | None:
    if values is None:
        return None
    if len(set(values.tolist())) > 1:
        raise BadRequest(f"{name} differs between the rows of one request ({sorted(set(values.tolist()))}); a "
                         "response's images have one shape: send one request per value")
    return int(values[0])


class OnexModel:
    """The inference callable: a batch of Triton requests -> one response (or refusal) each, through ``pipeline``."""

    def __init__(self, pipeline: BuildPipeline, limits: PromptLimits = PromptLimits()):
        self.pipeline, self.limits = pipeline, limits
        self._busy = threading.Condition()
        self._in_flight = 0
        self.images = 0  # served so far
        self.refused = 0  # requests refused because the server was stopping
        self.closing = False  # set by close(): calls are refused as UNAVAILABLE
        self.last_call = time.monotonic()

    def _prompt(self, i: int, raw) -> str:
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        if len(data) > self.limits.max_bytes:
            raise BadRequest(f"prompt {i} is {len(data)} bytes; at most {self.limits.max_bytes} bytes and "
                             f"{self.limits.max_chars} characters are accepted")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"prompt {i} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if len(text) > self.limits.max_chars:
            raise BadRequest(f"prompt {i} is {len(text)} characters; at most {self.limits.max_chars} are accepted")
        return text

    def parse(self, request) -> list[Request]:
        """One request's rows as pipeline requests (one per prompt, each with its seed); raises BadRequest."""
        if "prompt" not in request:
            raise BadRequest("input 'prompt' is missing: send one UTF-8 prompt per row, BYTES [rows, 1]")
        rows = np.asarray(request["prompt"]).shape[0]
        prompts = [self._prompt(i, raw) for i, raw in enumerate(_column(request, "prompt", None, rows))]
        seeds = _column(request, "seed", np.int64, rows)
        if seeds is None:  # a fresh seed per row; the response carries it so the image can be made again
            seeds = np.array([secrets.randbits(63) for _ in range(rows)], dtype=np.int64)
        per_prompt = _one(_column(request, "images_per_prompt", np.int64, rows), "images_per_prompt")
        resolution = _one(_column(request, "resolution", np.int64, rows), "resolution")
        out = [Request((p,), int(s), 1 if per_prompt is None else per_prompt, resolution)
               for p, s in zip(prompts, seeds)]
        try:
            self.pipeline.check_request(out[0])
        except UsageError as exc:
            raise BadRequest(exc.message) from None
        return out

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        self.last_call = time.monotonic()
        if self.closing:
            self.refused += len(requests)
            return [refusal(UNAVAILABLE, "the server is stopping: send the request again (to another replica)")
                    ] * len(requests)
        with self._counted():
            parsed: list[list[Request] | BadRequest] = []
            for request in requests:
                try:
                    parsed.append(self.parse(request))
                except BadRequest as exc:
                    parsed.append(exc)
            flat = [row for rows in parsed if not isinstance(rows, BadRequest) for row in rows]
            generations = iter(self.pipeline.generate_batch(flat) if flat else ())
            responses = []
            for rows in parsed:
                if isinstance(rows, BadRequest):
                    responses.append(refusal(INVALID_ARG, str(rows)))
                    continue
                done = [next(generations) for _ in rows]
                responses.append({
                    "image": np.stack([g.pixels() for g in done]),
                    "seed": np.array([[r.seed] for r in rows], dtype=np.int64),
                    # what the encoders cut from the row's prompt ("" when it fit)
                    "truncated": np.array([["; ".join(g.truncated).encode()] for g in done], dtype=object),
                    **{f"{s}_ms": np.array([[g.seconds[s] * 1000] for g in done], dtype=np.float32) for s in STAGES},
                })
            self.images += sum(r.rows for r in flat)
            self.last_call = time.monotonic()
            return responses

    @contextlib.contextmanager
    def _counted(self):
        with self._busy:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._busy:
                self._in_flight -= 1
                self._busy.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self, timeout: float) -> bool:
        """Refuse further calls (UNAVAILABLE) and wait up to ``timeout`` seconds for the running ones; True when
        none runs."""
        self.closing = True
        with self._busy:
            return self._busy.wait_for(lambda: not self._in_flight, timeout=timeout)
