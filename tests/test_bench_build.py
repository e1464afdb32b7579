"""The build benchmark end to end on a small stand-in for the real architectures (SD3-Medium's 2 B parameters
do not fit a unit test's time): random weights written in fp16, our build and the naive one, each in a child
process under the memory watchdog, and the report. Figures are the benchmark's to report; this checks the
plumbing and that each number is really measured."""
import json
import sys
import time

import torch
from safetensors import safe_open

from bench import build as bench_build
from bench import random_weights
from bench.random_weights import RandomSource, write_checkpoint
from onex_export.models import load_transformer
from onex_export.models.weights import INDEX_NAME

MINI = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=16,
            pos_embed_max_size=16)


def test_random_checkpoint_is_written_like_a_published_one(tmp_path):
    folder = write_checkpoint(MINI, tmp_path / "m", torch.bfloat16, shard_bytes=40_000)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / INDEX_NAME).is_file()
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    dtypes = set()
    for s in shards:
        with safe_open(str(s), framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16", "F32"}  # half weights beside the float32 position table
    model = load_transformer(str(folder), torch.bfloat16)
    source = RandomSource(MINI, torch.bfloat16)
    assert torch.equal(model.transformer_blocks[3].attn.to_q.weight, source.get("transformer_blocks.3.attn.to_q.weight"))
    # default initialisation: uniform within 1/sqrt(fan_in), norms at one
    w = source.get("transformer_blocks.3.ff.net.0.proj.weight").float()
    assert 0.9 / 16**0.5 < w.abs().max() <= 1 / 16**0.5 and w.std() > 0.3 / 16**0.5
    assert not torch.equal(source.get("transformer_blocks.3.attn.to_q.weight"), source.get("transformer_blocks.4.attn.to_q.weight"))
    # --weight-scale: the same draws of linear weights and biases, scaled (fp16 rounding apart); the position table
    full, half = RandomSource(MINI, torch.float16), RandomSource(MINI, torch.float16, scale=0.5)
    for key in ("transformer_blocks.3.ff.net.0.proj.weight", "transformer_blocks.3.attn.to_q.bias"):
        w, w_half = full.get(key).float(), half.get(key).float()
        assert (w_half - 0.5 * w).abs().max() < 1e-3 and 0.45 / 16**0.5 < w_half.abs().max() <= 0.5 / 16**0.5
    assert torch.equal(half.get("pos_embed.pos_embed"), full.get("pos_embed.pos_embed"))


def test_build_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(random_weights.ARCHS, "sd3-medium", MINI)  # the children read the checkpoint from disk
    code = bench_build.main(["--arch", "sd3-medium", "--resolution", "64", "--text-len", "16", "--trt", "none",
                             "--weight-scale", "0.5", "--out", str(tmp_path / "r"), "--workdir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "r" / "build.json").read_text())
    ours, naive = report["onex_export"], report["naive"]
    assert ours["status"] == "passed" and ours["exit_code"] == 0 and not ours["killed_over_limit"]
    assert set(ours["stages"]) == {"load", "export", "engines", "gate"}
    assert all(ours["stages"][s]["seconds"] > 0 and ours["stages"][s]["peak_rss_bytes"] > 50e6 for s in ("load", "export", "gate"))
    assert list(ours["graphs"]) == ["head", "segment", "reuse", "tail"] and ours["gate"]["status"] == "passed"
    assert naive["exit_code"] == 0 and set(naive["stages"]) == {"load", "export"}
    assert report["checkpoint"]["files"] == 1 and report["checkpoint"]["bytes"] > 0
    assert report["config"]["weight_scale"] == 0.5 and report["config"]["max_graph_gib"] == 2.0
    table = (tmp_path / "r" / "build.md").read_text()
    assert "| onex-export | export |" in table and "| naive | export |" in table and "random weights x0.5" in table
    assert list(tmp_path.glob("onex-bench-build-*")) == []  # the work folder is removed


def test_watchdog_stops_a_child_over_the_limit(tmp_path):
    code = "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"
    start = time.perf_counter()
    result = bench_build.run_child([sys.executable, "-c", code], 150 * 2**20, tmp_path / "log")
    assert result["killed_over_limit"] and result["exit_code"] != 0
    assert result["peak_rss_bytes"] > 150 * 2**20 and time.perf_counter() - start < 20
