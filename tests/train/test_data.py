"""Prompts and the on-disk text-embedding cache."""
import json
from types import SimpleNamespace

import pytest
import torch

from onex_export.models.text import build_tiny_text
from train.data import (DataError, DiffusersEncoder, EmbeddingStore, EncoderSpec, SD3Encoder, build_cache, cache_key,
                        encoder_spec, read_prompts)
from train.distributed import DistInfo

SINGLE = DistInfo(0, 1, 0, torch.device("cpu"))
TINY = SimpleNamespace(joint_attention_dim=48, pooled_projection_dim=40)
PROMPTS = ["a red fox", "a lighthouse in a storm", "ramen, top view", "an astronaut on a horse", "a harbor"]


def test_read_prompts_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x", "id": 1}) + "\n\n" + json.dumps({"caption": "y"}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl", key="caption") == ["x", "y"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\nnot json\n', "p.jsonl:2 is not JSON"),
    ('{"text": "a"}\n', "p.jsonl:1 has no string field 'prompt'"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_files(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DataError) as exc:
        read_prompts(tmp_path / "p.jsonl")
    assert message in str(exc.value)
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_cache_holds_the_encoders_outputs_and_the_empty_prompt(tmp_path):
    spec = encoder_spec("auto", "tiny-sd3", TINY, 256, torch.device("cpu"))
    folder = build_cache(tmp_path, PROMPTS, spec, "float32", SINGLE, shard_size=2, batch=3)
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
        "uncond.safetensors"]
    store = EmbeddingStore(folder)
    store.check_fits(TINY)
    assert len(store) == 5 and store.index["text_shape"] == [16, 48] and store.index["pooled_dim"] == 40
    encoder = spec.build()
    text, pooled = encoder(PROMPTS)
    rows = store.rows(torch.tensor([4, 0, 3, 3]))
    # encoded in batches of 3 (cache) vs 5 (here): matmul blocking may differ in the last bits
    torch.testing.assert_close(rows.text, text[[4, 0, 3, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows.pooled, pooled[[4, 0, 3, 3]], rtol=0, atol=1e-6)
    u_text, u_pooled = encoder([""])
    assert torch.equal(store.uncond().text, u_text) and torch.equal(store.uncond().pooled, u_pooled)
    assert (text[0] - u_text[0]).abs().max() > 1e-3  # the prompts do reach the embeddings


def test_a_complete_cache_is_not_rebuilt_and_a_new_prompt_set_is_another_cache(tmp_path):
    spec = encoder_spec("tiny", "tiny-sd3", TINY, 256, torch.device("cpu"))
    first = build_cache(tmp_path, PROMPTS, spec, "bfloat16", SINGLE, shard_size=4)

    def refuse():
        raise AssertionError("the encoder must not be built for a complete cache")

    again = build_cache(tmp_path, PROMPTS, EncoderSpec(spec.fingerprint, refuse), "bfloat16", SINGLE, shard_size=4)
    assert again == first
    assert EmbeddingStore(first).rows(torch.tensor([1])).text.dtype == torch.float32  # stored bf16, read fp32
    assert cache_key(PROMPTS + ["new"], spec.fingerprint, "bfloat16", 4) != first.name
    assert cache_key(PROMPTS, spec.fingerprint, "float32", 4) != first.name


def test_an_interrupted_build_only_encodes_what_is_missing(tmp_path):
    spec = encoder_spec("tiny", "tiny-sd3", TINY, 256, torch.device("cpu"))
    folder = build_cache(tmp_path, PROMPTS, spec, "float32", SINGLE, shard_size=2)
    (folder / "index.json").unlink()
    (folder / "shard-00001.safetensors").unlink()
    encoded = []

    def counting():
        enc = spec.build()

        def call(prompts):
            encoded.extend(prompts)
            return enc(prompts)

        return call

    build_cache(tmp_path, PROMPTS, EncoderSpec(spec.fingerprint, counting), "float32", SINGLE, shard_size=2)
    assert encoded == PROMPTS[2:4]
    assert len(EmbeddingStore(folder)) == 5


def test_cache_that_does_not_fit_the_model_is_refused(tmp_path):
    spec = encoder_spec("tiny", "tiny-sd3", TINY, 256, torch.device("cpu"))
    store = EmbeddingStore(build_cache(tmp_path, PROMPTS, spec, "float32", SINGLE))
    with pytest.raises(DataError, match="48/40 wide"):
        store.check_fits(SimpleNamespace(joint_attention_dim=4096, pooled_projection_dim=2048))
    with pytest.raises(DataError, match="not a complete embedding cache"):
        EmbeddingStore(tmp_path / "nothing")


def test_pipeline_encoders_need_a_folder():
    with pytest.raises(DataError, match="needs a pipeline folder"):
        encoder_spec("sd3", "tiny-sd3", TINY, 256, torch.device("cpu"))


def test_diffusers_encode_prompt_adapter_gives_the_same_embeddings():
    """diffusers' StableDiffusion3Pipeline.encode_prompt over the tiny encoders == onex-export's encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    enc, tok = build_tiny_text(48, 40)
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=enc.clip_l, tokenizer=tok.clip_l, text_encoder_2=enc.clip_g,
                                    tokenizer_2=tok.clip_g, text_encoder_3=enc.t5, tokenizer_3=tok.t5)
    ours = SD3Encoder(enc, tok, "ours", torch.device("cpu"))(PROMPTS[:2] + [""])
    theirs = DiffusersEncoder(pipe, tok.t5.model_max_length, "theirs")(PROMPTS[:2] + [""])
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
