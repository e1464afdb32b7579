"""The toy world's text side: SD3's three encoders at toy size, frozen, with a word-level tokenizer.

As SD3's encoders are frozen in training, these are never trained: seeded random CLIP-L, CLIP-G and T5 (two
layers each, onex_export.models.text.tiny_text_encoder) combined as SD3 combines them. The tokenizer knows the
toy world's words (digits, colours, sides and "a", "on", "the"), one token each, so that every prompt fits the
8 CLIP and 8 T5 positions: 16 text tokens for the transformer. A word outside the vocabulary becomes ``<unk>``.
Random encoders still tell prompts apart: a different word at a position changes that position's output and,
through attention, the pooled embedding (tests/toy check the 60 prompts' embeddings are distinct).
"""
from __future__ import annotations

from onex_export.models.text import SD3TextEncoder, tiny_text_encoder
from onex_export.contract.tokenizers import SD3Tokenizers

from .digits import VOCABULARY

TEXT_LEN = 8  # CLIP positions, and T5 positions: "<bos> a red 7 on the left <eos>" is 8 tokens
SPECIAL = ("<pad>", "<bos>", "<unk>", "<eos>")  # eos not at id 2: see tiny_text_encoder
TEXT_SEED = 0


def word_tokenizer(clip_style: bool):
    """A word-level fast tokenizer over :data:`VOCABULARY`, padding and cutting at :data:`TEXT_LEN`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *VOCABULARY))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "<bos> $A <eos>" if clip_style else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=TEXT_LEN)


def toy_text(joint_dim: int, pooled_dim: int) -> tuple[SD3TextEncoder, SD3Tokenizers]:
    """The frozen encoders (fitting a transformer of ``joint_dim`` / ``pooled_dim``) and their tokenizers."""
    special = (0, 1, 3)  # pad, bos, eos ids of SPECIAL
    encoder = tiny_text_encoder(joint_dim, pooled_dim, vocab_size=len(SPECIAL) + len(VOCABULARY), clip_len=TEXT_LEN,
                                special=special, seed=TEXT_SEED)
    return encoder, SD3Tokenizers(word_tokenizer(True), word_tokenizer(True), word_tokenizer(False))
