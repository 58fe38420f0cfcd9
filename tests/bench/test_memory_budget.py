"""The memory count (bench/memory_budget.py): exact terms on the meta device, the fused-attention
stand-in keeps what a fused kernel keeps, and the verdict against the card."""

import torch

from bench.arch import ARCHS, parameter_count
from bench.memory_budget import (GIB, _FusedAttentionMemory, against_card, count, diffusion_rows, format_table,
                                 saved_bytes)


def test_fused_attention_stand_in_keeps_inputs_output_and_one_float_per_query():
    q, k, v = (torch.zeros(2, 5, 64, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out, saved = saved_bytes(lambda: _FusedAttentionMemory.apply(q, k, v), exclude=set())
    assert out.shape == (2, 5, 64, 32)
    assert saved == 4 * q.numel() * 2 + 2 * 5 * 64 * 4  # q, k, v, out in bf16 + the float32 log-sum-exp
    # Exactly what torch's own fused CPU kernel keeps for the same call.
    _, fused = saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), exclude=set())
    assert fused == saved


def test_sd21_terms_are_exact_where_they_can_be():
    rows = {r.what: r for r in diffusion_rows("sd21", 64, 512, torch.bfloat16, lora=True, separate_phi=True)}
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        unet_params = parameter_count(UNet2DConditionModel(**ARCHS["sd21"].unet))
    assert rows["UNet weights"].bytes == 2 * unet_params  # bf16
    assert rows["D_phi's separate UNet (SD 2.1-v)"].bytes == rows["UNet weights"].bytes
    # Activations: positive, and well below what the weights of a 865 M model would suggest otherwise.
    assert 0.1 * GIB < rows["LoRA update, saved for backward"].bytes < 4 * GIB
    assert 0.1 * GIB < rows["VAE encode, saved for backward"].bytes < 4 * GIB
    assert 0 < rows["LoRA adapter + gradient + AdamW"].bytes < 0.1 * GIB


def test_a_stage_count_adds_up_and_says_whether_it_fits():
    r = count("2a")
    assert r["total_bytes"] == sum(row["bytes"] for row in r["rows"])
    assert r["fits"] == (r["total_bytes"] <= r["limit_bytes"]) and r["card_gb"] == 24
    assert "render, saved for backward" in {row["what"] for row in r["rows"]}
    assert "counted peak" in format_table(r)
    tiny_card = against_card(r, 1.0)
    assert not tiny_card["fits"] and "DOES NOT FIT" in format_table(tiny_card)


def test_the_whole_pipeline_peak_is_the_largest_stage_and_keeping_stage_1_models_would_add_their_weights():
    from bench.memory_budget import pipeline_peak

    def stage(name, weights, other):
        return {"stage": name, "total_bytes": weights + other,
                "rows": [{"what": "UNet weights", "bytes": weights}, {"what": "render, saved for backward", "bytes": other}]}

    whole = pipeline_peak([stage("1", 5 * GIB, 4 * GIB), stage("2b", 5 * GIB, 1 * GIB), stage("3", 10 * GIB, 6 * GIB)])
    assert whole == {"peak_bytes": 16 * GIB, "largest_stage": "3", "if_kept_bytes": 21 * GIB}
