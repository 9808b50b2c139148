"""Importance statistics (smartkv.core.importance): masks, normalisation, derived visibility counts, 8-bit codes."""
import torch

from smartkv.core.importance import (add_range, allowed_from_mask, attention_probs, decode_importance,
                                encode_importance, kv_head_mass, seen_counts, seen_from_ranges, token_weights,
                                update_mean)


def test_causal_mask_without_attention_mask():
    allowed = allowed_from_mask(None, 2, 5, 1, "cpu")[0, 0]
    assert allowed.tolist() == [[True] * 4 + [False], [True] * 5]


def test_additive_float_mask_is_read_as_zero_means_attend():
    m = torch.tensor([[[[0.0, float("-inf"), 0.0]]]])
    assert allowed_from_mask(m, 1, 3, 1, "cpu")[0, 0, 0].tolist() == [True, False, True]


def test_probs_are_normalised_and_masked():
    q, k = torch.randn(1, 6, 3, 8), torch.randn(1, 2, 5, 8)
    allowed = allowed_from_mask(None, 3, 5, 1, "cpu")
    p = attention_probs(q, k, allowed, 8 ** -0.5)
    assert torch.allclose(p.sum(-1), torch.ones(1, 6, 3))
    assert float(p[..., 0, 3:].abs().sum()) == 0.0
    assert kv_head_mass(p, 2).shape == (1, 2, 5)


def test_mean_is_normalised_by_how_many_queries_saw_the_token():
    # token 0 got 0.5 from each of 4 queries, token 3 got 0.5 from the one query that saw it: same importance
    mass = torch.tensor([[[2.0, 0.0, 0.0, 0.5]]])
    seen = torch.tensor([[4, 4, 4, 1]])
    mean, total = update_mean(torch.zeros(1, 1, 4), torch.zeros(1, 4, dtype=torch.int32), mass, seen)
    assert torch.allclose(mean[0, 0, [0, 3]], torch.tensor([0.5, 0.5]))
    # a later observation is averaged in, weighted by its count
    mean2, _ = update_mean(mean, total, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]), torch.ones(1, 4, dtype=torch.int32))
    assert torch.isclose(mean2[0, 0, 3], torch.tensor(0.75))


def test_seen_from_ranges_matches_the_mask_count():
    T = 12
    ranges = add_range(add_range(torch.empty(0, 2, dtype=torch.int64), 6, 10), 10, 11)
    assert ranges.tolist() == [[6, 11]]
    allowed = allowed_from_mask(None, 5, 11, 1, "cpu")
    assert seen_from_ranges(ranges, 11).tolist() == seen_counts(allowed)[0].tolist()
    assert seen_from_ranges(ranges, T)[11] == 0


def test_importance_codes_round_trip_within_five_percent():
    p = torch.tensor([1.0, 0.5, 0.1, 1e-3, 1e-6])
    back = decode_importance(encode_importance(p))
    assert torch.allclose(back, p, rtol=0.05)
    assert decode_importance(encode_importance(torch.zeros(1))).item() == 0.0


def test_token_weights_floor_and_power():
    imp = torch.tensor([[0.0, 1.0]])
    w = token_weights(imp, floor=0.0, power=1.0)
    assert w.tolist() == [[0.0, 1.0]]
    w = token_weights(imp, floor=1.0, power=2.0)   # floor = row mean 0.5
    assert torch.allclose(w, torch.tensor([[0.25, 2.25]], dtype=torch.float64))


def test_host_values_reach_the_device_as_given():
    """`host_to` (a prefill's small tables, copied without waiting on the stream) keeps the values, shape and dtype
    of a list, an array or a CPU tensor."""
    import numpy as np

    from smartkv.core.transfer import host_to

    src = torch.tensor([3, 0, 255], dtype=torch.uint8)
    for values in ([3, 0, 255], np.array([3, 0, 255]), src):
        out = host_to(values, torch.uint8, "cpu")
        assert out.dtype == torch.uint8 and out.tolist() == [3, 0, 255]
    out = host_to([[1, 2], [3, 4]], torch.int32, "cpu")
    assert out.shape == (2, 2) and out.dtype == torch.int32
