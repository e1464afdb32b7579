"""SD3's three tokenizers (CLIP-L, CLIP-G, T5) as a build carries them: a runtime tokenizes with these alone
(Hugging Face fast tokenizers; no model is loaded)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import Manifest


@dataclass(frozen=True)
class Tokenized:
    ids_l: torch.Tensor
    ids_g: torch.Tensor
    ids_t5: torch.Tensor
    truncated: tuple[str, ...]  # one line per prompt that lost tokens, saying which encoder cut what


@dataclass(frozen=True)
class SD3Tokenizers:
    """The three tokenizers (Hugging Face fast tokenizers), each padding to its maximum length."""

    clip_l: object
    clip_g: object
    t5: object

    def items(self):
        return (("clip_l", self.clip_l), ("clip_g", self.clip_g), ("t5", self.t5))

    def __call__(self, prompts: list[str]) -> Tokenized:
        ids, truncated = {}, []
        for name, tok in self.items():
            full = tok(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
            ids[name] = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                            return_tensors="pt")["input_ids"]
            for i, (prompt, seq) in enumerate(zip(prompts, full)):
                if len(seq) > tok.model_max_length:
                    kept = tok.decode(ids[name][i], skip_special_tokens=True)
                    truncated.append(f"{name} keeps {tok.model_max_length} of {len(seq)} tokens of {prompt!r}: "
                                     f"dropped {prompt[len(kept):]!r}")
        return Tokenized(ids["clip_l"], ids["clip_g"], ids["t5"], tuple(truncated))


def load_build_tokenizers(folder: Path, manifest: Manifest) -> SD3Tokenizers:
    """The tokenizers a build folder carries, as its manifest lists them."""
    from transformers import PreTrainedTokenizerFast

    toks = {}
    for name, entry in manifest.pipeline.tokenizers.items():
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder / entry.dir))
        tok.model_max_length = entry.max_length
        toks[name] = tok
    return SD3Tokenizers(toks["clip_l"], toks["clip_g"], toks["t5"])
