"""`kernels.batched`: a decode call's planned-before segments in one launch, read from a descriptor table."""
from __future__ import annotations

import gc

import pytest
import torch

from smartkv import kernels as kern
from smartkv.core.quant import quantize
from smartkv.kernels import KVSegment, batched, split, tuning
from smartkv.kernels import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = 3e-3


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("SMARTKV_FAST_ATTN", "0")
    monkeypatch.setenv("SMARTKV_BATCH_SEGMENTS", "1")


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layout(seed, B=2, H=2, D=64, fp=torch.float16):
    """SmartKV append's step: fp sinks, classes of mixed key/value widths and groups (normalised keys), a ring with
    device lengths (ragged), then a window that is a new object each call."""
    g = torch.Generator().manual_seed(seed)

    def kv(T):
        k = torch.randn(B, H, T, D, generator=g) + torch.randn(1, 1, 1, D, generator=g) * 3
        return k.to(DEV), torch.randn(B, H, T, D, generator=g).to(DEV)
    mu = torch.randn(B, H, 1, D, generator=g).half().to(DEV)
    sd = (torch.randn(B, H, 1, D, generator=g).abs() + 0.5).half().to(DEV)
    segs = [KVSegment(*(t.to(fp) for t in kv(4)), stable=True)]
    for kb, vb, n, vg in ((8, 4, 9, 32), (4, 2, 40, 16), (3, 3, 17, 32), (2, 2, 70, 32), (4, 3, 33, 16)):
        k, v = kv(n)
        segs.append(KVSegment(quantize(k, kb, 32), quantize(v, vb, vg), key_scale=sd, key_shift=mu, stable=True))
    k, v = kv(50)
    segs.append(KVSegment(quantize(k, 4, 32), quantize(v, 4, 32), key_scale=sd, key_shift=mu,
                          lengths=torch.tensor([50, 21], device=DEV), stable=True))
    wk, wv = kv(7)
    return segs, (wk.to(fp), wv.to(fp)), g


def _launches(monkeypatch):
    calls = []
    run = batched.run
    monkeypatch.setattr(batched, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    return calls


@pytest.mark.parametrize("fp,D", [(torch.float16, 64), (torch.bfloat16, 64), (torch.float16, 256)])
def test_one_launch_over_every_width_equals_the_reference(fp, D, monkeypatch):
    """Every width, group size and kind in one launch (head_dim 256: Gemma 3's)."""
    segs, (wk, wv), g = _layout(1, D=D, fp=fp)
    q = torch.randn(2, 6, 1, D, generator=g).to(fp).to(DEV)
    calls = _launches(monkeypatch)
    for _ in range(2):   # the table built at the first call, read at the second
        win = KVSegment(wk, wv)
        got, probs = kern.decode_attention(q, segs + [win], 0.125, return_token_probs=True)
    assert calls
    exact, want = kern.decode_attention_reference(q, segs + [win], 0.125, return_token_probs=True,
                                                  compute_dtype=torch.float64)
    bound = BOUND if fp == torch.float16 else 1e-2   # the output is rounded to bf16
    assert rel(got, exact) < bound, rel(got, exact)
    for p, pe in zip(probs, want, strict=True):
        assert rel(p, pe) < BOUND, rel(p, pe)
    assert float(probs[-2][1, :, 21:].abs().max()) == 0.0   # the ring's tokens past a sequence's length
    if D == 256:   # the specialised split kernel fails to compile some of this mix at head_dim 256 on an H100
        return     # (Triton 3.6, TritonGPUOptimizeDotOperands; benchmarks/batched_gpu.out): no per-segment comparison
    monkeypatch.setenv("SMARTKV_BATCH_SEGMENTS", "0")
    n = len(calls)
    alone = kern.decode_attention(q, segs + [win], 0.125)
    assert len(calls) == n and rel(got, alone) < bound


def test_a_small_batch_is_cut_until_the_card_is_full():
    """A batch of one reads a few rows (SmolLM2: 3 KV heads): its segments are cut into programs until the card's
    slots are full, at most SPLIT_TOKENS a program; a large batch keeps SPLIT_TOKENS."""
    dev = torch.device(DEV)
    slots = 2 * tuning.sm_count(dev)
    tps = batched._group_tps([8000], 3, 64, dev)
    assert tps % 16 == 0 and tps < batched.SPLIT_TOKENS and 3 * -(-8000 // tps) >= slots // 2, tps
    assert batched._group_tps([2048], 64, 64, dev) == batched.SPLIT_TOKENS   # 8 x 8 rows at MAX_ROWS


@pytest.mark.parametrize("block_s", [16, 128])
def test_many_splits_merge_in_steps_of_any_size(block_s, monkeypatch):
    """Segments cut into many programs (16 tokens each here) and their partials merged in steps of `block_s`
    (fewer than the splits, or all at once) equal the reference, folds included (in blocks of 16 tokens: a fold
    over several programs)."""
    monkeypatch.setattr(batched, "SPLIT_TOKENS", 16)
    monkeypatch.setattr(batched, "FOLD_TOKENS", 16)
    monkeypatch.setattr(batched, "_merge_block", lambda splits, head_dim: block_s)
    segs, (wk, wv), g = _layout(5)
    B, H, NG = 2, 2, 3
    q = torch.randn(B, H * NG, 1, 64, generator=g).half().to(DEV)
    ring = torch.randint(0, 256, (B, H, 50), generator=g, dtype=torch.uint8).to(DEV)
    seen = torch.randint(0, 250, (B, 50), generator=g, dtype=torch.uint8).to(DEV)
    splits = []
    run = batched.run
    monkeypatch.setattr(batched, "run", lambda c, *a, **k: splits.append(c.splits) or run(c, *a, **k))
    probs_out = [None] * (len(segs) - 1) + [kern.FoldInto(ring, seen, NG), None]
    for _ in range(2):   # the table built at the first call, read at the second
        codes, counts = ring.clone(), seen.clone()
        probs_out[-2] = kern.FoldInto(codes, counts, NG)
        got, _ = kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125, return_token_probs=True,
                                       probs_out=probs_out)
    assert splits and min(splits) > 16, splits
    exact, probs = kern.decode_attention_reference(q, segs + [KVSegment(wk, wv)], 0.125, return_token_probs=True,
                                                   compute_dtype=torch.float64)
    assert rel(got, exact) < BOUND, rel(got, exact)
    want_codes, want_counts = ring.clone(), seen.clone()
    kern.importance_fold(want_codes, probs[-2].float() / NG, want_counts, 1)
    assert (codes.int() - want_codes.int()).abs().max() <= 1 and not torch.equal(codes, ring)


def test_folds_and_probabilities_of_batched_segments(monkeypatch):
    """SmartKV append's observing step: classes folding their importance with the previous normaliser (STORE 2), the
    ring's and the window's probabilities folded into their codes (`FoldInto`, from the batched launch's scores, in
    the merge's launch): two launches in all, and what the per-segment launches give (codes within one step, counts
    equal, lse to fp16-operand accuracy)."""
    segs, (wk, wv), g = _layout(2)
    B, H, NG = 2, 2, 3
    q = torch.randn(B, H * NG, 1, 64, generator=g).half().to(DEV)
    n_cls = len(segs) - 2
    codes0 = [torch.randint(0, 256, (B, H, s.num_tokens), generator=g, dtype=torch.uint8).to(DEV) for s in segs[1:-1]]
    fold0 = [(torch.randint(0, 256, (B, H, n), generator=g, dtype=torch.uint8).to(DEV),
              torch.randint(0, 250, (B, n), generator=g, dtype=torch.uint8).to(DEV)) for n in (50, 7)]
    seen = torch.tensor([5.0], device=DEV)
    lse0 = torch.randn(B, H * NG, generator=g).to(DEV) + 6

    def step():
        codes, lse = [c.clone() for c in codes0], lse0.clone()
        into = [(c.clone(), s.clone()) for c, s in fold0]
        out, probs = kern.decode_attention(
            q, segs + [KVSegment(wk, wv)], 0.125, return_token_probs=True,
            probs_out=[None] * (1 + n_cls) + [kern.FoldInto(c, s, NG) for c, s in into],
            fold=[None] + [(c, seen) for c in codes] + [None, None], lse_io=lse)
        assert probs == [None] * len(probs)
        return out, codes + [c for c, _ in into], [s for _, s in into], lse
    calls = _launches(monkeypatch)
    got = step()
    kernels = []
    for mod in (split, batched):   # every segment (the window too) in one launch, then the merge with the folds
        monkeypatch.setattr(mod, "launch", lambda fn, *a, _l=mod.launch, **k: kernels.append(fn.__name__) or
                            _l(fn, *a, **k))
    got = step()
    assert kernels == ["_batched_kernel", "_merge_fold_kernel"], kernels
    # more programs than a grid's second dimension holds (query heads + fold blocks): the merge and each fold apart
    monkeypatch.setattr(batched, "MAX_GRID_Y", H * NG + 1)
    kernels.clear()
    apart = step()
    assert kernels == ["_batched_kernel", "_merge_kernel", "_probs_fold_kernel", "_probs_fold_kernel"], kernels
    assert torch.equal(apart[0], got[0]) and torch.equal(apart[3], got[3])
    # a fold's program works out the log2-sum-exps from the partials itself: equal to the merge's to rounding, so a
    # code on a rounding boundary may differ by one
    for a, b in zip(apart[1], got[1]):
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 0.01
    assert all(torch.equal(a, b) for a, b in zip(apart[2], got[2]))
    monkeypatch.setenv("SMARTKV_BATCH_SEGMENTS", "0")
    n = len(calls)
    want = step()
    assert len(calls) == n and len(kernels) > 2
    assert rel(got[0], want[0]) < BOUND
    for a, b, c0 in zip(got[1], want[1], codes0 + [c for c, _ in fold0]):
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 0.05 and not torch.equal(a, c0)
    for a, b, (_, s0) in zip(got[2], want[2], fold0):
        assert torch.equal(a, b) and not torch.equal(a, s0)
    assert (got[3] - want[3]).abs().max() < 1.5e-2 and (got[3] - lse0).abs().max() > 0.1


def test_a_stable_segments_checks_hold_for_the_tensors_checked_only():
    """What a call checks of a stable segment (its fit to q, its fold's codes and count) is skipped at later calls
    only while the same tensors come: a fold's codes of the wrong width or dtype, or a q of another batch, still
    raise after a call that passed."""
    segs, (wk, wv), g = _layout(4)
    B, H, NG = 2, 2, 3
    q = torch.randn(B, H * NG, 1, 64, generator=g).half().to(DEV)
    seen = torch.tensor([5.0], device=DEV)
    lse = torch.zeros(B, H * NG, device=DEV)
    codes = [torch.full((B, H, s.num_tokens), 255, dtype=torch.uint8, device=DEV) for s in segs[1:-1]]

    def call(q, codes):
        return kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125, return_token_probs=True,
                                     fold=[None] + [(c, seen) for c in codes] + [None, None], lse_io=lse)
    for _ in range(2):
        call(q, codes)
    narrow = codes[:1] + [codes[1][..., :-1]] + codes[2:]
    with pytest.raises(ValueError, match="fold"):
        call(q, narrow)
    with pytest.raises(ValueError, match="fold"):
        call(q, codes[:2] + [codes[2].to(torch.int16)] + codes[3:])
    kern.decode_attention(q, segs, 0.125)
    with pytest.raises(ValueError, match="do not fit"):   # the stable segments alone: no window to catch it
        kern.decode_attention(q[:1], segs, 0.125)
    call(q, codes)


def test_the_table_is_built_once_per_set_of_segments(monkeypatch):
    """Stable segments: one table, built at their first call. A segment replaced (a flush): a new one, reading the
    new segment. More rows than MAX_ROWS, or segments not marked stable: the per-segment launches."""
    segs, (wk, wv), g = _layout(3)
    q = torch.randn(2, 6, 1, 64, generator=g).half().to(DEV)
    tables = batched.STATS["tables"]
    kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
    assert batched.STATS["tables"] == tables + 1
    for _ in range(2):
        kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
    assert batched.STATS["tables"] == tables + 1
    checked = []   # a stable segment's strides and dtypes are checked at its first call only
    row_ok = batched._row_ok
    monkeypatch.setattr(batched, "_row_ok", lambda seg, lengths: checked.append(seg) or row_ok(seg, lengths))
    kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
    assert not any(seg.stable for seg in checked)
    monkeypatch.setattr(batched, "_row_ok", row_ok)
    gc.collect()   # earlier tests' dead segments (in reference cycles) leave their entries now, not mid-count
    held = len(batched._GROUPS)
    k2 = torch.randn(2, 2, 40, 64, generator=g).to(DEV) * 4
    segs[2] = KVSegment(quantize(k2, 4, 32), segs[2].values, key_scale=segs[2].key_scale, key_shift=segs[2].key_shift,
                        stable=True)
    got = kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
    assert batched.STATS["tables"] == tables + 2
    gc.collect()
    assert len(batched._GROUPS) == held   # the replaced segment's table left with it
    want = kern.decode_attention_reference(q, segs + [KVSegment(wk, wv)], 0.125, compute_dtype=torch.float64)
    assert rel(got, want) < BOUND
    calls = _launches(monkeypatch)
    loose = [KVSegment(s.keys, s.values, lengths=s.lengths, key_scale=s.key_scale, key_shift=s.key_shift)
             for s in segs]
    got = kern.decode_attention(q, loose + [KVSegment(wk, wv)], 0.125)
    assert not calls and rel(got, want) < BOUND
    monkeypatch.setattr(batched, "MAX_ROWS", 2 * 2 * 100)
    got = kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
    assert not calls and rel(got, want) < BOUND


def test_segments_it_cannot_read_launch_alone(monkeypatch):
    """Per-channel keys with a residual (KIVI) beside batched classes: the one launch takes the classes, the
    KIVI segment its own kernel; the call still equals the reference."""
    segs, (wk, wv), g = _layout(4)
    k, v = (torch.randn(2, 2, 40, 64, generator=g).to(DEV) for _ in range(2))
    kivi = KVSegment(quantize(k[..., :32, :], 2, 32, axis=-2), quantize(v[..., :32, :], 2, 32),
                     key_residual=k[..., 32:, :].half(), value_residual=v[..., 32:, :].half())
    q = torch.randn(2, 6, 1, 64, generator=g).half().to(DEV)
    calls = _launches(monkeypatch)
    for _ in range(2):
        got = kern.decode_attention(q, [kivi] + segs + [KVSegment(wk, wv)], 0.125)
    assert calls
    want = R.decode_attention_reference(q, [kivi] + segs + [KVSegment(wk, wv)], 0.125, compute_dtype=torch.float64)
    assert rel(got, want) < BOUND


def test_each_dots_setting_reaches_the_launch_and_others_are_refused(monkeypatch):
    """SMARTKV_BATCH_DOTS sets the batched dots' operands (tf32x3 unless set); a value outside its choices is a
    one-line error naming the variable and the choices, raised before any table is built."""
    segs, (wk, wv), g = _layout(6)
    q = torch.randn(2, 6, 1, 64, generator=g).half().to(DEV)
    for name, (scores, values) in [("", ("tf32x3", "tf32"))] + [(k, v) for k, v in batched.DOTS.items()]:
        monkeypatch.setattr(batched, "_GROUPS", {})
        if name:
            monkeypatch.setenv("SMARTKV_BATCH_DOTS", name)
        else:
            monkeypatch.delenv("SMARTKV_BATCH_DOTS", raising=False)
        kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
        (g0,) = batched._GROUPS.values()
        assert (g0.meta["PREC_S"], g0.meta["PREC_V"]) == (scores, values)
    monkeypatch.setattr(batched, "_GROUPS", {})
    monkeypatch.setenv("SMARTKV_BATCH_DOTS", "fp16")
    with pytest.raises(ValueError, match="SMARTKV_BATCH_DOTS must be one of fp32, tf32, tf32x3, got 'fp16'"):
        kern.decode_attention(q, segs + [KVSegment(wk, wv)], 0.125)
    assert not batched._GROUPS
