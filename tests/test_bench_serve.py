"""`python -m bench.serve` end to end at a small count: the in-process pipeline, then a real `onex-export serve`."""
import json

import pytest

from bench.serve import main

pytest.importorskip("tritonclient.grpc")


def test_serving_benchmark_writes_its_report_and_served_images_equal_in_process(tmp_path, capsys):
    assert main(["--clients", "1", "--clients", "3", "--requests", "6", "--warmup", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve.json").read_text())
    assert [level["clients"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        for mode in ("in_process", "served"):
            s = level[mode]
            assert s["requests"] == 6 and 0 < s["p50_ms"] <= s["p99_ms"] and s["images_per_s"] > 0
        served = level["served"]
        assert served["identical_images"] is True
        assert 1.0 <= served["mean_batch"] <= 4.0  # Triton's own statistics; at most the build's largest batch
        assert served["throughput_ratio"] == pytest.approx(served["images_per_s"] / level["in_process"]["images_per_s"])
        assert 0 < served["pipeline_p50_ms"] < served["p50_ms"]  # the round trip holds the pipeline's time
    assert report["levels"][0]["served"]["mean_batch"] == 1.0  # one client: nothing to batch with
    table = (tmp_path / "serve.md").read_text()
    assert "| 3 |" in table and "| yes |" in table
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [(["--clients", "0"], "0 must be at least 1"),
                                           (["--requests", "x"], "'x' is not an integer"),
                                           (["--backend", "triton"], "is not one of")])
def test_serving_benchmark_refuses_bad_arguments_at_parse_time(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path)])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
