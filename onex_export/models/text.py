"""SD3's three text encoders (CLIP-L, CLIP-G, T5) as one module, with SD3's way of combining them.

``prompt_embeds = cat(pad(cat(clip_l[-2], clip_g[-2]), to T5 width), t5, dim=tokens)`` and
``pooled = cat(clip_l.text_embeds, clip_g.text_embeds)``: CLIP contributes its penultimate hidden
states (77 tokens each in SD3), T5 its last (256 tokens), so the transformer sees 77 + 256 = 333.

The embedded tiny models get tiny encoders of the same structure and a byte-level tokenizer built in
code (no downloads); real models load from an SD3/SD3.5 pipeline folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from ..contract.tokenizers import SD3Tokenizers

TINY_CLIP_LEN = 8  # tiny stand-ins for SD3's 77 CLIP tokens ...
TINY_T5_LEN = 8  # ... and 256 T5 tokens: 8 + 8 = 16 text tokens for the tiny transformers


class SD3TextEncoder(nn.Module):
    """CLIP-L + CLIP-G + T5 -> ``(prompt_embeds (B, L_clip + L_t5, J), pooled (B, P))``."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5

    def forward(self, ids_l: torch.Tensor, ids_g: torch.Tensor, ids_t5: torch.Tensor):
        """Token ids (B, L_clip), (B, L_clip), (B, L_t5) -> embeddings for the transformer."""
        out_l = self.clip_l(ids_l, output_hidden_states=True)
        out_g = self.clip_g(ids_g, output_hidden_states=True)
        t5 = self.t5(ids_t5).last_hidden_state
        clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)


def byte_tokenizer(max_length: int, clip_style: bool):
    """A byte-level tokenizer built in code: 3 special tokens + 256 bytes, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    template = "<bos> $A <eos>" if clip_style else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=max_length)


def tiny_text_encoder(joint_dim: int, pooled_dim: int, vocab_size: int = 259, clip_len: int = TINY_CLIP_LEN,
                      special: tuple[int, int, int] = (0, 1, 2), seed: int = 0) -> SD3TextEncoder:
    """Tiny CLIP-L/CLIP-G/T5 (2 layers each, seeded random weights) whose outputs fit a tiny transformer
    (``joint_dim``, ``pooled_dim``). ``special``: the pad, bos and eos token ids. (An eos id of 2 makes
    transformers' CLIP pool at the highest token id rather than at eos, its legacy behaviour.)"""
    pad, bos, eos = special
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    width_l = pooled_dim * 2 // 5  # split the pooled width 2:3, like SD3's 768 + 1280
    widths = (width_l, pooled_dim - width_l)
    if sum(widths) > joint_dim:
        raise ValueError(f"CLIP widths {widths} do not fit the joint width {joint_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clips = [
            CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=vocab_size, hidden_size=w, intermediate_size=2 * w, projection_dim=w, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=clip_len, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad, hidden_act="quick_gelu"))
            for w in widths
        ]
        t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim,
                                     num_layers=2, num_heads=4, pad_token_id=pad, eos_token_id=eos))
    return SD3TextEncoder(*clips, t5).eval()


def build_tiny_text(joint_dim: int, pooled_dim: int, seed: int = 0) -> tuple[SD3TextEncoder, SD3Tokenizers]:
    """Tiny CLIP-L/CLIP-G/T5 whose outputs fit a tiny transformer (``joint_dim``, ``pooled_dim``), with
    byte-level tokenizers."""
    encoder = tiny_text_encoder(joint_dim, pooled_dim, seed=seed)
    tokenizers = SD3Tokenizers(byte_tokenizer(TINY_CLIP_LEN, True), byte_tokenizer(TINY_CLIP_LEN, True),
                               byte_tokenizer(TINY_T5_LEN, False))
    return encoder, tokenizers


def _check_text_folders(folder: Path) -> None:
    missing = [d for d in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                           "tokenizer_3") if not (folder / d).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} has no {', '.join(missing)}: text encoders need an SD3 pipeline folder",
                             "point --model at the pipeline folder, or build without --components text")


def load_text_encoder(folder: Path) -> SD3TextEncoder:
    """The three encoders of an SD3/SD3.5 diffusers pipeline folder, in float32 whatever the files hold
    (components run in float32: T5 overflows in fp16). T5-XXL alone is 19 GB in float32."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    _check_text_folders(folder)
    f32 = dict(torch_dtype=torch.float32)
    try:
        encoder = SD3TextEncoder(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **f32),
                                 CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **f32),
                                 T5EncoderModel.from_pretrained(folder / "text_encoder_3", **f32)).float()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the text encoders in {folder}: {exc}") from exc
    return encoder.eval()


def load_tokenizers(folder: Path, t5_length: int = 256) -> SD3Tokenizers:
    """The three tokenizers of an SD3/SD3.5 diffusers pipeline folder (T5 cut at ``t5_length``, as SD3 does, or at
    the tokenizer's own maximum when that is shorter: a small model's T5 may take fewer tokens)."""
    from transformers import AutoTokenizer

    _check_text_folders(folder)
    try:
        toks = [AutoTokenizer.from_pretrained(folder / d, use_fast=True) for d in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizers in {folder}: {exc}") from exc
    toks[2].model_max_length = min(t5_length, toks[2].model_max_length)
    return SD3Tokenizers(*toks)


def load_text(folder: Path, t5_length: int = 256) -> tuple[SD3TextEncoder, SD3Tokenizers]:
    """The encoders and tokenizers of an SD3/SD3.5 diffusers pipeline folder."""
    return load_text_encoder(folder), load_tokenizers(folder, t5_length)


SD3_T5_LENGTH = 256  # T5 tokens SD3's pipeline uses by default (its tokenizer allows 512)
SD3_TEXT_LENGTH = 77 + SD3_T5_LENGTH  # what the transformer sees from a real SD3 pipeline
SD3_MAX_TEXT_LENGTH = 77 + 512  # the most SD3's encoders give: T5 at diffusers' max_sequence_length 512


def text_length(model: str, t5_length: int | None = SD3_T5_LENGTH) -> int:
    """Text tokens ``model``'s encoders give its transformer: CLIP's maximum plus T5's, T5 cut at ``t5_length`` (None:
    at its tokenizer's own maximum, the most it can give). Embedded tiny models give 16; a pipeline folder says it
    with its tokenizers; a folder holding only a transformer is assumed to be SD3's (333, or 77 + 512)."""
    from .zoo import TINY_MODELS, TINY_TEXT_LEN, model_path

    if model in TINY_MODELS:
        return TINY_TEXT_LEN
    folder = model_path(model)
    if not all((folder / d).is_dir() for d in ("tokenizer", "tokenizer_3")):
        return SD3_TEXT_LENGTH if t5_length is not None else SD3_MAX_TEXT_LENGTH
    toks = load_tokenizers(folder, t5_length if t5_length is not None else 10**9)
    return toks.clip_l.model_max_length + toks.t5.model_max_length

