"""Quality metrics against a reference (KL, NLL, perplexity, agreement, relative and attention-output errors) and
the speed helpers."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from smartkv.metrics.quality import (attention_output, attention_output_error, kl_divergence, nll, perplexity,
                                     relative_error, top1_agreement)
from smartkv.metrics.speed import Timer, peak_memory_bytes, reset_peak_memory, time_ms, tokens_per_s


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(2, 7, 50) * 3  # (batch, positions, vocab)


def test_kl_of_identical_logits_is_zero_per_position(logits):
    kl = kl_divergence(logits, logits)
    assert kl.shape == (2, 7)
    assert torch.equal(kl, torch.zeros(2, 7))


def test_kl_ignores_a_constant_shift_and_is_positive_otherwise(logits):
    assert kl_divergence(logits, logits + 5.0).max().item() < 1e-5
    assert (kl_divergence(logits, torch.randn_like(logits)) > 0).all()


def test_kl_is_ref_to_test_direction():
    ref, test = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # p = (1/2, 1/2), q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_divergence(ref, test).item() == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(test, ref).item() != pytest.approx(expected, rel=1e-3)


def test_kl_of_bf16_logits_is_computed_in_fp32(logits):
    kl = kl_divergence(logits.bfloat16(), logits.bfloat16())
    assert kl.dtype == torch.float32 and kl.abs().max().item() == 0.0


def test_nll_and_perplexity_match_cross_entropy(logits):
    targets = torch.randint(0, 50, (2, 7))
    per_token = nll(logits, targets)
    assert torch.allclose(per_token, F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
    assert perplexity(logits, targets) == pytest.approx(math.exp(per_token.mean().item()))
    assert perplexity(per_token) == pytest.approx(perplexity(logits, targets))
    assert perplexity(torch.zeros(3, 10), torch.zeros(3, dtype=torch.long)) == pytest.approx(10.0)  # uniform
    with pytest.raises(ValueError):
        perplexity([])


def test_top1_agreement(logits):
    assert top1_agreement(logits, logits) == 1.0
    flipped = logits.clone()
    flipped[0, 0] = -flipped[0, 0]  # the argmax of one position of 14 changes
    assert top1_agreement(logits, flipped) == pytest.approx(13 / 14)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref, torch.tensor([3.0, 5.0])) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.zeros(2), torch.ones(2)) == math.inf


def test_attention_output_matches_sdpa_with_gqa_and_causal_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)  # 4 query heads, 2 KV heads
    k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for causal in (False, True):
        expected = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal)
        assert torch.allclose(attention_output(q, k, v, causal=causal), expected, atol=1e-5)


def test_causal_queries_are_the_last_positions():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    last_two = attention_output(q[:, :, -2:], k, v, causal=True)
    assert torch.allclose(last_two, attention_output(q, k, v, causal=True)[:, :, -2:], atol=1e-6)


def test_attention_output_error_zero_for_same_kv_and_grows_with_noise():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    assert attention_output_error(q, k, v, k, v) == 0.0
    small = attention_output_error(q, k, v, k + 0.01 * torch.randn_like(k), v + 0.01 * torch.randn_like(v))
    large = attention_output_error(q, k, v, k + 0.5 * torch.randn_like(k), v + 0.5 * torch.randn_like(v))
    assert 0 < small < large


def test_timer_and_time_ms_measure_wall_clock():
    with Timer("cpu") as t:
        time.sleep(0.02)
    assert 15 < t.ms < 500
    assert 5 < time_ms(lambda: time.sleep(0.01), repeats=3, warmup=1) < 500
    with pytest.raises(ValueError, match="repeats"):
        time_ms(lambda: None, repeats=0)


def test_tokens_per_s_and_cpu_peak_memory():
    assert tokens_per_s(100, 500.0) == 200.0
    assert math.isnan(tokens_per_s(10, 0.0))
    reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_counts_an_allocation():
    reset_peak_memory("cuda")
    x = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    assert peak_memory_bytes("cuda") >= 1 << 20
    del x
