"""The fast-path ladder (bench/switches.py) turns each switch on in order and measures every rung
on the same inputs; on CPU with the tiny architecture (no timing thresholds)."""

import pytest
import torch

from bench.switches import format_table, ladder, main, measure


@pytest.fixture(scope="module")
def result(bench_workdir):
    return measure("tiny", "cpu", repeats=1, warmup=0, workdir=str(bench_workdir))


def test_every_rung_is_applied_and_timed(result):
    rows = result["rows"]
    assert [r["label"] for r in rows] == [r.label for r in ladder(torch.device("cpu"), compile_unet=False)]
    assert "unfused-attention-unet" in rows[0]["applied"] and rows[0]["dtype"] == "float32"
    assert "sdpa-unet" in rows[1]["applied"] and "channels-last-unet" in rows[2]["applied"]
    assert rows[-1]["dtype"] == "bfloat16" and "channels-last-unet" in rows[-1]["applied"]
    for r in rows:
        assert all(r[k] > 0 for k in ("prior_unet_ms", "lora_update_ms", "vae_encode_fwd_bwd_ms"))
        assert r["total_ms"] == pytest.approx(r["prior_unet_ms"] + r["lora_update_ms"] + r["vae_encode_fwd_bwd_ms"])


def test_precision_price_is_reported(result):
    """Attention kernels and memory layout change rounding only; bf16 changes the estimate by
    about its precision (8 mantissa bits), not by more."""
    diffs = [r["rel_diff_to_baseline"] for r in result["rows"]]
    assert diffs[0] == 0.0
    assert max(diffs[1:3]) < 1e-4
    assert 1e-4 < diffs[-1] < 20 * torch.finfo(torch.bfloat16).eps


def test_ladder_on_cuda_adds_tf32_and_compile():
    labels = [r.label for r in ladder(torch.device("cuda"), compile_unet=True)]
    assert labels[3] == "+ TF32" and labels[-1] == "+ torch.compile (UNet)"
    assert ladder(torch.device("cuda"), compile_unet=True)[-1].fast.compile_unet


def test_command_line_prints_the_table(result, monkeypatch, capsys, tmp_path):
    import bench.switches as switches

    monkeypatch.setattr(switches, "measure", lambda *a, **k: result)
    assert main(["--arch", "tiny", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_table(result)
    assert "+ SDPA attention" in out and "x base" in out
    assert (tmp_path / "s.json").exists()
