"""Triton kernels vs the torch reference and an fp64 reference, on CUDA or through Triton's CPU interpreter.

Bounds: quantize-and-pack is byte-exact. Decode attention (fp16 operands on the tensor cores: q, p, and for
per-channel keys q * scale) is within 3e-3 relative, ||out - ref|| / ||ref|| (1e-2 for a bf16 output), of exact
fp64 attention over the dequantized cache; token probabilities within 3e-3, and they sum to the group size.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py puts Triton in its interpreter on machines without a GPU

import smartkv.kernels as kern  # noqa: E402
from smartkv.kernels import reference as R  # noqa: E402
from smartkv.core.quant import quantize  # noqa: E402

from smartkv.kernels import KVSegment  # noqa: E402
from smartkv.kernels import tuning  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = 3e-3


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    """These tests are the Triton kernels' (tests/test_cuda_attn.py has the CUDA fast path's)."""
    monkeypatch.setenv("SMARTKV_FAST_ATTN", "0")


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(g, *shape, scale=1.0, dtype=torch.float16):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def test_kernels_available_here():
    assert kern.kernels_available(DEV)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_pack_is_byte_exact(bits, axis):
    g = gen(bits * 10 - axis)
    x = randn(g, 2, 3, 64, 64, scale=3.0) + 1.5
    x[0, 1, 5] = 0.25                      # a constant group: scale 0, codes 0
    x[1, 2, :, 7] = 1e4                    # large values
    a = kern.quantize_pack(x, bits, 32, axis)
    b = quantize(x.float().cpu(), bits, 32, axis)
    assert torch.equal(a.codes.cpu(), b.codes)
    assert torch.equal(a.scale.cpu(), b.scale) and torch.equal(a.zero.cpu(), b.zero)
    c = quantize(x.float(), bits, 32, axis)  # core's quantizer on the kernels' device: the CPU's bytes too
    assert all(torch.equal(getattr(c, f).cpu(), getattr(b, f)) for f in ("codes", "scale", "zero"))


def test_quantize_pack_without_aligned_rows_is_byte_exact():
    """3-bit codes of head_dim 32 are 12 bytes a token: 3 tokens make a head's codes 36 bytes, not a multiple of 16,
    so the kernel takes its unhinted variant (kernels.triton_quant._aligned)."""
    from smartkv.kernels import triton_quant
    x = randn(gen(7), 2, 3, 3, 32, scale=2.0)
    assert not triton_quant._aligned(x, triton_quant._empty_like_q(x, 3, 16, -1))
    a, b = kern.quantize_pack(x, 3, 16), quantize(x.float().cpu(), 3, 16)
    assert all(torch.equal(getattr(a, f).cpu(), getattr(b, f)) for f in ("codes", "scale", "zero"))


def test_quantize_pack_kv_into_preallocated_rows():
    g = gen(1)
    k = randn(g, 2, 4, 3, 128, dtype=torch.bfloat16)
    v = randn(g, 2, 4, 3, 128, scale=50.0, dtype=torch.bfloat16)
    out = tuple(quantize(torch.zeros(2, 4, 8, 128, device=DEV), 4, 32) for _ in range(2))
    qk, qv = kern.quantize_pack_kv(k, v, 4, 32, out=out, start=5)
    assert qk is out[0] and qv is out[1]
    for q, x in ((qk, k), (qv, v)):
        ref = quantize(x.float().cpu(), 4, 32)
        assert torch.equal(q.codes[..., 5:, :].cpu(), ref.codes)
        assert torch.equal(q.scale[..., 5:, :].cpu(), ref.scale)
        assert not q.codes[..., :5, :].any()   # rows before `start` untouched


def _check(q, segments, lengths=None, probs=True):
    scaling = q.shape[-1] ** -0.5
    got = kern.decode_attention(q, segments, scaling, lengths, return_token_probs=probs)
    exact = kern.decode_attention_reference(q, segments, scaling, lengths, return_token_probs=probs,
                                            compute_dtype=torch.float64)
    ref32 = kern.decode_attention_reference(q, segments, scaling, lengths)
    out, ex = (got[0], exact[0]) if probs else (got, exact)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    bound = BOUND if q.dtype != torch.bfloat16 else 1e-2   # the output itself is rounded to bf16 (2^-9)
    assert rel(out, ex) < bound, rel(out, ex)
    assert rel(out, ref32) < bound
    if probs:
        for p, pe in zip(got[1], exact[1], strict=True):
            assert p.shape == pe.shape and torch.isfinite(p).all()
            assert rel(p, pe) < BOUND, rel(p, pe)
    return got


def _tune(monkeypatch, kinds, **fields):
    """Set `fields` on the launch config of every key kind in `kinds` (per-width and wide entries included)."""
    table = tuning.current()
    keys = [k for k in table.split if (k if isinstance(k, int) else k[0]) in kinds]
    _use(monkeypatch, split={k: fields for k in keys})


def _use(monkeypatch, **changes):
    """Launch with the current tuning table changed by `changes` (tuning.with_changes) until the test ends."""
    monkeypatch.setattr(tuning, "_active", tuning.with_changes(tuning.current(), **changes))


def _kv(g, B, H, T, D, vscale=1.0):
    k = randn(g, B, H, T, D, dtype=torch.float32) + randn(g, 1, 1, 1, D, scale=3.0, dtype=torch.float32)
    return k, randn(g, B, H, T, D, scale=vscale, dtype=torch.float32)


@pytest.mark.parametrize("bits,T,NG,D", [(8, 97, 4, 64), (4, 33, 4, 128), (4, 1, 1, 64), (2, 70, 8, 64),
                                         (3, 64, 3, 64)])
def test_uniform_per_token(bits, T, NG, D):
    g = gen(bits + T)
    B, H = 2, 2
    k, v = _kv(g, B, H, T, D, vscale=4.0)
    q = randn(g, B, H * NG, 1, D)
    _check(q, [KVSegment(quantize(k, bits, 32), quantize(v, bits, 32))])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_every_code_mode_gives_the_same_attention(bits, mode, monkeypatch):
    """Codes reach the tensor cores as exact integers (mode 1) or fp16 subnormals (0, 2, and 3, where a code
    reads as code * 2^(place in its byte * bits) and the kernel undoes that per channel): all the same function,
    with keys and values of one token in different groups of channels, ragged lengths and a value scale range
    of 10^4 between tokens (one normalisation per split must neither overflow nor lose the small ones)."""
    _tune(monkeypatch, (0, 1), code_mode=mode)  # full-precision and per-token keys
    g = gen(100 * bits + mode)
    B, H, T, D = 3, 2, 301, 64
    k, v = _kv(g, B, H, T, D)
    v = v * torch.logspace(-2, 2, T, device=v.device)[:, None]           # scales from 0.01x to 100x
    lengths = torch.tensor([301, 130, 7], device=DEV)
    q = randn(g, B, H * 4, 1, D)
    segs = [KVSegment(quantize(k, bits, 32), quantize(v, bits, 32))]
    out = _check(q, segs, lengths)[0]
    exact = kern.decode_attention_reference(q, segs, D ** -0.5, lengths, compute_dtype=torch.float64)
    for b in range(B):  # each sequence on its own: the short one holds only the smallest values
        assert rel(out[b], exact[b]) < BOUND, (b, rel(out[b], exact[b]))


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
@pytest.mark.parametrize("block_n", [32, 64])
def test_every_loop_schedule_gives_the_same_attention(prefetch, block_n, monkeypatch):
    """Loads at use, one block ahead, or software-pipelined (block i's values next to block i+1's scores):
    the same function, across split and block boundaries, ragged lengths and a residual-last token."""
    _tune(monkeypatch, (1,), prefetch=prefetch, block_n=block_n, min_split_tokens=64)
    g = gen(7 * prefetch + block_n)
    B, H, T, D = 3, 2, 333, 64
    k, v = _kv(g, B, H, T, D)
    lengths = torch.tensor([333, 97, 1], device=DEV)
    q = randn(g, B, H * 4, 1, D)
    _check(q, [KVSegment(quantize(k, 4, 32), quantize(v, 8, 32))], lengths)
    last = torch.stack([k[torch.arange(B), :, lengths - 1], v[torch.arange(B), :, lengths - 1]])  # (2, B, H, D)
    seg = KVSegment(quantize(k, 4, 32), quantize(v, 4, 32), key_residual=last[0, :, :, None].half(),
                    value_residual=last[1, :, :, None].half(), lengths=lengths, residual_last=True)
    _check(q, [seg], probs=False)


@pytest.mark.parametrize("NG,group,warps", [(4, 32, 1), (2, 32, 1), (1, 32, 1), (8, 32, 4), (4, 16, 4)])
def test_wide_dots_keep_four_warp_programs(NG, group, warps):
    """Per-token keys run one-warp programs while their dots have at most 16 columns (query heads per KV head x
    key/value groups); wider ones (8 heads, or groups of 16 channels at head_dim 128) would spill in one warp and
    take 4 warps x 128 tokens. Either way the same attention."""
    from smartkv.kernels import split as dec

    g = gen(NG * 100 + group)
    B, H, T, D = 2, 2, 150, 128
    k, v = _kv(g, B, H, T, D)
    seg = KVSegment(quantize(k, 4, group), quantize(v, 4, group))
    plan = dec._plan([seg], B, H, NG, D, k.device)[0]
    assert plan.tuning.num_warps == warps and plan.block_n == (32 if warps == 1 else 128)
    _check(randn(g, B, H * NG, 1, D), [seg], torch.tensor([150, 61], device=DEV))


@pytest.mark.parametrize("block_s,warps", [(16, 1), (64, 4), (128, 2)])
def test_merge_of_many_splits(block_s, warps, monkeypatch):
    """The merge of many partials (64-token splits: 9 to 40 per sequence, ragged) reads them 16, 64 or 128 at a
    time: the same attention, the same token probabilities."""
    from smartkv.kernels import split as dec

    _tune(monkeypatch, (1,), min_split_tokens=64, merge_block_s=block_s, merge_warps=warps,
          few_merge_block_s=block_s, few_merge_warps=warps)
    g = gen(block_s + warps)
    B, H, T, D = 2, 2, 2500, 64
    k, v = _kv(g, B, H, T, D)
    seg = KVSegment(quantize(k, 4, 32), quantize(v, 4, 32))
    plan = dec._plan([seg], B, H, 4, D, k.device)[0]
    assert plan.n_splits > 16 and dec._merge_config([plan], D, B * H * 4, 132) == (block_s, warps)
    _check(randn(g, B, H * 4, 1, D), [seg], torch.tensor([2500, 600], device=DEV))


def test_merge_config_by_merge_programs(monkeypatch):
    """Fewer merge programs than SMs take the few_ merge settings, more take the others; head_dim 256 gets two
    warps at least; the largest setting of a launch's segments wins."""
    from smartkv.kernels import split as dec

    _tune(monkeypatch, (1,), merge_block_s=16, merge_warps=1, few_merge_block_s=128, few_merge_warps=4)
    seg = KVSegment(*(quantize(x, 4, 32) for x in _kv(gen(1), 1, 2, 300, 64)))
    plan = dec._plan([seg], 1, 2, 4, 64, seg.keys.codes.device)[0]
    assert dec._merge_config([plan], 64, 131, 132) == (128, 4)
    assert dec._merge_config([plan], 64, 132, 132) == (16, 1)
    assert dec._merge_config([plan], 256, 1536, 132) == (16, 2)
    wide = dec._Launch(**dict(vars(plan), tuning=tuning.Tuning(merge_block_s=40, merge_warps=8)))
    assert dec._merge_config([plan, wide], 64, 1536, 132) == (64, 8)


def test_splits_fill_whole_waves():
    """The split planner takes the fewest waves' worth of time: a grid whose last wave is mostly empty costs a
    whole wave (H200, int4 at 32K x 48, 264 slots: 2 splits, 3 waves, measured 1482 us; 3 splits, 5 waves,
    1645 us), and a split never falls under the minimum."""
    import triton

    from smartkv.kernels.tuning import SPLIT_OVERHEAD_BLOCKS, _splits

    def cost(blocks, programs, slots, per):
        return triton.cdiv(programs * triton.cdiv(blocks, per), slots) * (per + SPLIT_OVERHEAD_BLOCKS)

    assert triton.cdiv(256, _splits(256, 48 * 8, 264, 2)) == 2
    for blocks, programs, slots, min_blocks in [(256, 384, 264, 2), (256, 64, 264, 2), (1024, 8, 132, 4),
                                                (3, 16, 264, 1), (1, 1, 8, 2), (700, 120, 396, 2)]:
        per = _splits(blocks, programs, slots, min_blocks)
        assert per >= min_blocks
        assert all(cost(blocks, programs, slots, per) <= cost(blocks, programs, slots, p) + 1e-9
                   for p in range(min_blocks, blocks + 1))


def test_splits_of_several_segments_fill_whole_waves():
    """SmartKV's values pass cuts every segment of its launch (pools of different sizes, the sinks, the window)
    at one split size: the planner minimises the same cost over the launch's total split count."""
    import triton

    from smartkv.kernels.tuning import SPLIT_OVERHEAD_BLOCKS, splits_of

    def cost(blocks, programs, slots, per):
        n = sum(triton.cdiv(b, per) for b in blocks)
        return triton.cdiv(programs * n, slots) * (per + SPLIT_OVERHEAD_BLOCKS)

    rng = np.random.default_rng(3)
    cases = [((256, 512, 3, 0), 64, 1056, 4), ((1, 1), 1, 8, 2), ((0,), 8, 132, 1), ((128, 128), 64, 264, 32)]
    cases += [(tuple(int(b) for b in rng.integers(0, 700, rng.integers(1, 6))), int(rng.integers(1, 400)),
               int(rng.choice([132, 264, 1056])), int(rng.integers(1, 9))) for _ in range(200)]
    for blocks, programs, slots, min_blocks in cases:
        per = splits_of(blocks, programs, slots, min_blocks)
        assert per >= min_blocks
        best = min(cost(blocks, programs, slots, p) for p in range(min_blocks, max(blocks + (min_blocks,)) + 1))
        assert cost(blocks, programs, slots, per) <= best + 1e-9


def test_full_precision_segment_bf16_query():
    g = gen(7)
    k, v = _kv(g, 2, 2, 45, 64)
    q = randn(g, 2, 8, 64, dtype=torch.bfloat16)          # (B, Hq, D) form
    _check(q, [KVSegment(k.half(), v.half())])


@pytest.mark.parametrize("Tk,Tv,T", [(64, 90, 100), (96, 50, 130), (32, 32, 32), (0, 20, 20), (64, 0, 64),
                                     (128, 127, 129)])
def test_kivi_windows(Tk, Tv, T):
    g = gen(Tk * 7 + Tv)
    B, H, D = 2, 2, 64
    k, v = _kv(g, B, H, T, D)
    seg = KVSegment(quantize(k[..., :Tk, :], 2, 32, -2), quantize(v[..., :Tv, :], 2, 32),
                    k[..., Tk:, :].half(), v[..., Tv:, :].half())
    _check(randn(g, B, H * 4, 1, D), [seg])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_kivi_every_code_mode_gives_the_same_attention(bits, mode, monkeypatch):
    """Per-channel keys (their scale folded into the query per block) in every code mode, with per-token values
    in the same mode, across the full-precision windows: the same function (mode 3 divides the scaled query's
    channels by the place of each code in its byte)."""
    _tune(monkeypatch, (2,), code_mode=mode)
    g = gen(10 * bits + mode)
    B, H, D, T, Tk = 2, 2, 64, 200, 160
    k, v = _kv(g, B, H, T, D)
    seg = KVSegment(quantize(k[..., :Tk, :], bits, 32, -2), quantize(v[..., :Tk, :], bits, 32),
                    k[..., Tk:, :].half(), v[..., Tk:, :].half())
    _check(randn(g, B, H * 4, 1, D), [seg], torch.tensor([200, 77], device=DEV))


@pytest.mark.parametrize("block_n", [32, 64])
def test_kivi_blocks_of_fewer_groups(block_n, monkeypatch):
    """Per-channel keys in blocks of fewer key groups than the query has column sets (one-warp programs):
    each token still reads its own group's column, across windows and ragged lengths."""
    from smartkv.kernels import split as dec

    _tune(monkeypatch, (2,), block_n=block_n, num_warps=1, min_split_tokens=64)
    g = gen(block_n + 5)
    B, H, D, T, Tk = 3, 2, 64, 230, 192
    k, v = _kv(g, B, H, T, D)
    seg = KVSegment(quantize(k[..., :Tk, :], 2, 32, -2), quantize(v[..., :Tk, :], 2, 32),
                    k[..., Tk:, :].half(), v[..., Tk:, :].half())
    plan = dec._plan([seg], B, H, 4, D, k.device)[0]
    assert plan.block_n == block_n and plan.tps % block_n == 0
    _check(randn(g, B, H * 4, 1, D), [seg], torch.tensor([230, 101, 3], device=DEV))


def test_ragged_batch_lengths():
    g = gen(11)
    B, H, T, D = 3, 2, 80, 64
    k, v = _kv(g, B, H, T, D)
    lengths = torch.tensor([80, 17, 0], device=DEV)
    seg = KVSegment(quantize(k, 4, 32), quantize(v, 4, 32))
    out, probs = _check(randn(g, B, H * 4, 1, D), [seg], lengths)
    assert (out[2] == 0).all()                                  # no valid token: output 0
    assert (probs[0][1, :, 17:] == 0).all()
    torch.testing.assert_close(probs[0][:2].sum(-1), torch.full((2, H), 4.0, device=DEV), rtol=1e-3, atol=1e-3)


def test_mixed_precision_pools_with_key_normalisation():
    """SmartKV's layout: fp sinks, one pool per width (each with its own count), fp window, normalised keys."""
    g = gen(13)
    B, H, D, NG = 2, 2, 64, 4
    mu = randn(g, B, H, 1, D, dtype=torch.float32)
    sd = randn(g, B, H, 1, D, dtype=torch.float32).abs() + 0.5
    segs = [KVSegment(*(t.half() for t in _kv(g, B, H, 4, D)))]
    for bits, n in ((8, 9), (4, 40), (3, 17), (2, 70)):
        k, v = _kv(g, B, H, n, D)
        segs.append(KVSegment(quantize(k, bits, 32), quantize(v, bits, 32), key_scale=sd.half(), key_shift=mu.half()))
    segs.append(KVSegment(*(t.half() for t in _kv(g, B, H, 31, D))))
    pool_len = torch.tensor([40, 33], device=DEV)             # ragged inside one pool only
    segs[2] = KVSegment(segs[2].keys, segs[2].values, lengths=pool_len, key_scale=sd.half(), key_shift=mu.half())
    _, probs = _check(randn(g, B, H * NG, 1, D), segs)
    total = sum(p.sum(-1) for p in probs)
    torch.testing.assert_close(total, torch.full((B, H), float(NG), device=DEV), rtol=1e-3, atol=1e-3)


def test_a_segment_passed_again_is_planned_once_and_reads_what_it_holds(monkeypatch):
    """An eager caller that passes the same segment objects step after step (SmartKV's classes between flushes) has
    their launches planned once; each call still reads the segments' tensors as they are then, and a segment at
    another place in the list, or one whose tokens the plan had to copy, is planned again."""
    from smartkv.kernels import split
    g = gen(21)
    B, H, D, NG = 1, 2, 64, 3
    sink = KVSegment(*(t.half() for t in _kv(g, B, H, 4, D)))
    k, v = _kv(g, B, H, 50, D)
    cls = KVSegment(quantize(k, 4, 32), quantize(v, 2, 32))
    wk, wv = (t.half() for t in _kv(g, B, H, 9, D))
    win = KVSegment(wk, wv)
    planned = []
    side = split._side
    monkeypatch.setattr(split, "_side", lambda *a: planned.append(1) or side(*a))
    q = randn(g, B, H * NG, 1, D)
    _check(q, [sink, cls, win])
    assert len(planned) == 6                           # keys and values of three segments
    _check(q, [sink, cls, win])
    assert len(planned) == 6                           # the same objects: nothing planned again
    k2, v2 = _kv(g, B, H, 50, D)                       # the class's codes rewritten in place, as a demotion does
    for dst, src in ((cls.keys, quantize(k2, 4, 32)), (cls.values, quantize(v2, 2, 32))):
        for a, b in ((dst.codes, src.codes), (dst.scale, src.scale), (dst.zero, src.zero)):
            a.copy_(b)
    wk.copy_(randn(g, B, H, 9, D))
    _check(q, [sink, cls, win])                        # against the reference over the new contents
    _check(q, [cls, sink, win])                        # another order: two segments at other places
    assert len(planned) == 10
    strided = KVSegment(*(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (wk, wv)))
    _check(q, [sink, cls, strided])
    _check(q, [sink, cls, strided])
    # the first call plans sink and class again (the reorder replaced their plans), the window's copy every call
    assert len(planned) == 18
    strided.keys.copy_(randn(g, B, H, 9, D))
    _check(q, [sink, cls, strided])


def test_importance_folded_in_the_pass_with_the_previous_normaliser():
    """`fold` (SmartKV's append classes): a segment's importance codes take the mean after one more query whose
    token masses are 2^(s - lse_io) summed over the group's heads / NG, and lse_io becomes the query's own
    log2-sum-exp. With lse_io already the query's own, that is `importance_fold` of its probabilities; the kernel
    equals the reference (codes within one step of 9%, lse to fp16-operand accuracy), tokens past a pool's length
    keep their codes, the output is the same as without the fold and a segment beside it still gets its
    probabilities."""
    g = gen(23)
    B, H, D, NG = 2, 2, 64, 4
    mu = randn(g, B, H, 1, D, dtype=torch.float32)
    sd = randn(g, B, H, 1, D, dtype=torch.float32).abs() + 0.5
    segs = [KVSegment(*(t.half() for t in _kv(g, B, H, 4, D)))]
    for bits, n in ((4, 300), (2, 170)):
        k, v = _kv(g, B, H, n, D)
        segs.append(KVSegment(quantize(k, bits, 32), quantize(v, bits, 32), key_scale=sd.half(), key_shift=mu.half()))
    pool_len = torch.tensor([300, 211], device=DEV)
    segs[1] = KVSegment(segs[1].keys, segs[1].values, lengths=pool_len, key_scale=sd.half(), key_shift=mu.half())
    segs.append(KVSegment(*(t.half() for t in _kv(g, B, H, 9, D))))
    q = randn(g, B, H * NG, 1, D)
    codes = [torch.randint(0, 256, (B, H, n + 5), generator=g, dtype=torch.uint8).to(DEV) for n in (300, 170)]
    seen = torch.tensor([7.0], device=DEV)
    out_ref, probs = kern.decode_attention_reference(q, segs, 0.125, return_token_probs=True)

    def folds(cs):
        return [None, (cs[0], seen), (cs[1], seen), None]
    lse = torch.zeros(B, H * NG, device=DEV)
    kern.decode_attention_reference(q, segs, 0.125, fold=folds([c.clone() for c in codes]), lse_io=lse)
    own = [c.clone() for c in codes]
    kern.decode_attention_reference(q, segs, 0.125, fold=folds(own), lse_io=lse.clone())
    for c, mine, p in zip(codes, own, probs[1:3]):
        want = c.clone()
        R.importance_fold_reference(want[..., :p.shape[-1]], p, seen, 1, NG)
        want[0, :, 300:], want[1, :, 211:300] = c[0, :, 300:], c[1, :, 211:300]
        assert (want.int() - mine.int()).abs().max() <= 1
    lse_k, lse_r = lse - 0.7, lse - 0.7                                  # a previous query's normaliser
    got_c, ref_c = [c.clone() for c in codes], [c.clone() for c in codes]
    win = [None, None, None, torch.zeros(B, H, 9, device=DEV)]
    out_k, pk = kern.decode_attention(q, segs, 0.125, return_token_probs=True, probs_out=win, fold=folds(got_c),
                                      lse_io=lse_k)
    kern.decode_attention_reference(q, segs, 0.125, fold=folds(ref_c), lse_io=lse_r)
    assert rel(out_k, out_ref) < BOUND and rel(pk[3], probs[3]) < BOUND and pk[1] is None
    assert (lse_k - lse).abs().max() < 1.5e-2 and (lse_r - lse).abs().max() < 1e-5   # fp16 operands: 4e-3
    for c, a, b in zip(codes, got_c, ref_c):
        assert (a.int() - b.int()).abs().max() <= 1 and not torch.equal(a, c)
        assert ((b.int() - c.int()) < 0).float().mean() > 0.5   # the masses are 2^0.7 x the probabilities
    for t in (got_c[0], ref_c[0]):
        assert torch.equal(t[0, :, 300:], codes[0][0, :, 300:]) and torch.equal(t[1, :, 211:], codes[0][1, :, 211:])
    with pytest.raises(ValueError, match="probs_out entry must be None"):
        kern.decode_attention(q, segs, 0.125, probs_out=[None, win[3][..., :1].expand(B, H, 300), None, None],
                              return_token_probs=True, fold=folds(got_c), lse_io=lse_k)


def test_token_probs_accumulate():
    g = gen(17)
    k, v = _kv(g, 1, 2, 50, 64)
    seg = KVSegment(quantize(k, 8, 32), quantize(v, 8, 32))
    q = randn(g, 1, 8, 1, 64)
    acc = [torch.ones(1, 2, 50, device=DEV)]
    _, probs = kern.decode_attention(q, [seg], 0.125, return_token_probs=True, probs_out=acc)
    _, ref = kern.decode_attention_reference(q, [seg], 0.125, return_token_probs=True)
    assert probs[0] is acc[0]
    assert rel(acc[0] - 1, ref[0]) < BOUND


def test_probabilities_fold_into_codes_and_counts():
    """`FoldInto` (SmartKV's append ring and window): a segment's probabilities folded into its importance codes
    as one more query, its valid tokens' counts advanced (saturating at 255), nothing else touched: against the
    reference's probabilities folded by importance_fold_reference. A quantized segment with lengths (the ring) and
    a full-precision one without (the window)."""
    g = gen(23)
    B, H, NG, D = 2, 2, 4, 64
    k, v = _kv(g, B, H, 90, D)
    ring = KVSegment(quantize(k[..., :60, :], 4, 32), quantize(v[..., :60, :], 4, 32),
                     lengths=torch.tensor([60, 37], device=DEV))
    win = KVSegment(k[..., 60:, :].half(), v[..., 60:, :].half())
    q = randn(g, B, H * NG, D)
    codes = [torch.randint(0, 256, (B, H, n), generator=g, dtype=torch.uint8).to(DEV) for n in (60, 30)]
    seen = [torch.randint(0, 256, (B, n), generator=g, dtype=torch.uint8).to(DEV) for n in (60, 30)]
    for c, s in zip(codes, seen):
        c[..., :3], s[:, :3] = 255, torch.tensor([0, 254, 255], dtype=torch.uint8)
    _, probs = R.decode_attention_reference(q, [ring, win], 0.125, return_token_probs=True)
    want_c, want_s = [c.clone() for c in codes], [s.clone() for s in seen]
    for c, s, p, n in zip(want_c, want_s, probs, ([60, 37], [30, 30])):
        R.importance_fold_reference(c, p, s, 1, NG)
        ok = torch.arange(s.shape[-1], device=DEV) < torch.tensor(n, device=DEV)[:, None]
        s += (ok & (s < 255)).to(torch.uint8)
    for fn in (kern.decode_attention, R.decode_attention_reference):
        got_c, got_s = [c.clone() for c in codes], [s.clone() for s in seen]
        _, out = fn(q, [ring, win], 0.125, return_token_probs=True,
                    probs_out=[kern.FoldInto(c, s, NG) for c, s in zip(got_c, got_s)])
        assert out == [None, None]
        for c0, a, b, s, t in zip(codes, got_c, want_c, got_s, want_s):
            assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 0.05 and not torch.equal(a, c0)
            assert torch.equal(s, t)
        assert torch.equal(got_s[0][1, 37:], seen[0][1, 37:]) and got_s[1][:, 2].eq(255).all()
    with pytest.raises(ValueError, match=r"probs_out\[1\] folds into codes"):
        kern.decode_attention(q, [ring, win], 0.125, return_token_probs=True,
                              probs_out=[None, kern.FoldInto(codes[1][..., :20], seen[1], NG)])
    with pytest.raises(ValueError, match="needs return_token_probs"):
        kern.decode_attention(q, [ring, win], 0.125, probs_out=[None, kern.FoldInto(codes[1], seen[1], NG)])


def test_segment_errors_are_clear():
    g = gen(19)
    k, v = _kv(g, 1, 2, 40, 64)
    with pytest.raises(ValueError, match="same tokens"):
        KVSegment(quantize(k[..., :32, :], 2, 32, -2), quantize(v, 2, 32), k[..., 30:, :])
    with pytest.raises(ValueError, match="q_heads a multiple"):
        kern.decode_attention(randn(g, 1, 3, 64), [KVSegment(k, v)], 0.125)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("N,NG,D,G,shared,config", [(37, 3, 64, 32, True, None), (5, 4, 128, 64, False, None),
                                                    (70, 1, 16, 16, True, None), (150, 4, 64, 32, True, (64, 16, 8)),
                                                    (41, 4, 128, 32, True, None), (33, 2, 64, 16, True, None),
                                                    (41, 4, 128, 32, True, (32, 32, 4, 0)),
                                                    (150, 4, 128, 64, True, (128, 32, 4)),
                                                    (150, 4, 128, 32, True, (32, 32, 1))])
def test_pool_two_pass_kernels(bits, N, NG, D, G, shared, config, monkeypatch):
    """SmartKV's two passes over its layout in one launch each: full-precision sinks, two width pools whose
    tokens interleave in the middle (each row its own interleaving), the full-precision window. Scores land at
    every position; values come back as (pools' part, full-precision part). Against the torch reference and
    fp64. Positions as views of one buffer (what the cache passes) or as separate tensors; another launch config
    (tokens per scores block / values block, warps, heads padded to 16 rather than packed) gives the same. Head
    padding: NG 4 x 4 groups packs into 16 columns; NG 2 x 4 groups pads each group's heads to 4."""
    from smartkv.core.quant import dequantize
    from smartkv.kernels import reference as R
    from smartkv.kernels import triton_pool

    if config:
        fields = ("scores_block", "values_block", "num_warps", "pack_heads")
        _use(monkeypatch, pool=dict(zip(fields, config)))

    g = gen(bits * 1000 + N)
    B, Hkv = 2, 2
    Hq = Hkv * NG
    n_sink, n_win, N2 = 3, 5, N // 2 + 1
    Tm = N + N2
    T = n_sink + Tm + n_win
    other = 2 if bits == 8 else 8
    pools = [quantize(randn(g, B, Hkv, n, D, scale=2.0, dtype=torch.float32), b, G, axis=-1)
             for b, n in ((bits, N), (other, N2))]
    perm = torch.stack([torch.stack([torch.randperm(Tm, generator=g) for _ in range(Hkv)]) for _ in range(B)])
    order = torch.cat([perm[..., :N].sort(-1).values, perm[..., N:].sort(-1).values], -1).to(torch.int32).to(DEV)
    pos = [order[..., :N], order[..., N:]] if shared else [order[..., :N].clone(), order[..., N:].clone()]
    segs = [(p, ps, n_sink) for p, ps in zip(pools, pos)]
    sink_k, win_k = randn(g, B, Hkv, n_sink, D), randn(g, B, Hkv, n_win, D)
    fp = [(sink_k, 0), (win_k, n_sink + Tm)]
    q, q_fp = randn(g, B, Hq, D, dtype=torch.float32), randn(g, B, Hq, D, dtype=torch.float32)
    bias = randn(g, B, Hq, dtype=torch.float32)
    scaling = D ** -0.5

    logits = torch.full((B, Hq, T), -7.0, device=DEV)
    ref_logits = logits.clone()
    kern.pool_scores(q, segs, logits, scaling, bias, q_fp, fp)
    R.pool_scores_reference(q, segs, ref_logits, scaling, bias, q_fp, fp)
    exact = torch.empty(B, Hq, T, dtype=torch.float64)
    for (pool, _, _), ps in zip(segs, pos):
        k64 = dequantize(pool, torch.float64).cpu()
        s = (q.double().cpu().reshape(B, Hkv, NG, D) @ k64.transpose(-1, -2)).reshape(B, Hq, -1)
        exact.scatter_(-1, (ps.long().cpu() + n_sink).repeat_interleave(NG, 1), s + bias.double().cpu()[..., None])
    for x, start in fp:
        s = (q_fp.double().cpu().reshape(B, Hkv, NG, D) @ x.double().cpu().transpose(-1, -2)).reshape(B, Hq, -1)
        exact[..., start:start + x.shape[-2]] = s
    assert rel(logits, exact * scaling) < BOUND
    assert rel(logits, ref_logits) < BOUND

    probs = torch.softmax(randn(g, B, Hq, T, scale=3.0, dtype=torch.float32), -1)
    values = [(pool, ps, n_sink) for pool, ps in zip([quantize(randn(g, B, Hkv, n, D, dtype=torch.float32), b, G)
                                                      for b, n in ((other, N), (bits, N2))], pos)]
    fp_v = [(randn(g, B, Hkv, n_sink, D), 0), (randn(g, B, Hkv, n_win, D), n_sink + Tm)]
    p64 = probs.double().cpu()
    mid64 = sum((p64.gather(-1, (ps.long().cpu() + n_sink).repeat_interleave(NG, 1)).reshape(B, Hkv, NG, -1)
                 @ dequantize(pool, torch.float64).cpu()).reshape(B, Hq, D) for pool, ps, _ in values)
    fp64 = sum((p64[..., st:st + x.shape[-2]].reshape(B, Hkv, NG, -1) @ x.double().cpu()).reshape(B, Hq, D)
               for x, st in fp_v)
    ref_mid, ref_fp = R.pool_values_reference(probs, values, fp_v)
    codes = torch.randint(0, 256, (B, Hkv, T), generator=g, dtype=torch.uint8)
    ranges = [(0, 4), (T - 9, T - 1)]
    folded = codes.clone()
    R.importance_update_reference(folded, probs.cpu(), ranges)
    for per_split in (32, 1 << 30):
        got_codes = codes.clone().to(DEV)
        mid, fp_out = kern.pool_values(probs, values, fp_v, per_split, importance=(got_codes, ranges))
        assert mid.shape == fp_out.shape == (B, Hq, D) and mid.dtype == torch.float32
        assert rel(mid, mid64) < BOUND and rel(fp_out, fp64) < BOUND
        assert rel(mid, ref_mid) < BOUND and rel(fp_out, ref_fp) < BOUND
        # the same launch folded probs into every position's importance code, once (segments cover all T)
        diff = (got_codes.cpu().int() - folded.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05 and not torch.equal(folded, codes)
    if not config:  # the decode queries' range ending per sequence where the device says (static decode steps)
        end = torch.tensor([T - 1, T - 4], dtype=torch.int32, device=DEV)
        got_codes = codes.clone().to(DEV)
        kern.pool_values(probs, values, fp_v, 32, importance=(got_codes, [(0, 4), (0, 0), (0, 0), (T - 9, 0)], end))
        for b, e in enumerate(end.tolist()):
            want = codes[b:b + 1].clone()
            R.importance_update_reference(want, probs[b:b + 1].cpu(), [(0, 4), (T - 9, e)])
            diff = (got_codes[b:b + 1].cpu().int() - want.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05
        with pytest.raises(ValueError, match="range_end"):
            kern.pool_values(probs, values, fp_v, 32, importance=(got_codes, ranges, end))


@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("config", [(32, 32, 4), (64, 16, 8), (16, 16, 8), (32, 32, 8)])
def test_pool_kernels_three_bit_small_tiles(D, config, monkeypatch):
    """3-bit pools (8 codes per 3 bytes): compiled on an H200, blocks of 16 tokens (any head_dim, any warps) and
    head_dim 16 gave wrong sums, and 4 groups per token (head_dim 64 in groups of 16) did not compile; the wrappers
    use blocks of 32 tokens at least with a 3-bit pool, and those shapes take the torch path (pool_ok). Whatever
    the config asks for: scores and values equal the torch reference."""
    from smartkv.kernels import reference as R
    from smartkv.kernels import triton_pool

    _use(monkeypatch, pool=dict(zip(("scores_block", "values_block", "num_warps"), config)))
    g = gen(D * 100 + config[0])
    B, Hkv, NG, N, n_sink = 2, 2, 2, 45, 2
    pos = torch.arange(N, dtype=torch.int32).expand(B, Hkv, N).contiguous().to(DEV)
    keys = quantize(randn(g, B, Hkv, N, D, scale=2.0, dtype=torch.float32), 3, 16, axis=-1)
    vals = quantize(randn(g, B, Hkv, N, D, dtype=torch.float32), 3, 16, axis=-1)
    fp = [(randn(g, B, Hkv, n_sink, D), 0)]
    q = randn(g, B, Hkv * NG, D, dtype=torch.float32)
    logits = torch.empty(B, Hkv * NG, n_sink + N, device=DEV)
    ref = logits.clone()
    kern.pool_scores(q, [(keys, pos, n_sink)], logits, D ** -0.5, None, q, fp)
    R.pool_scores_reference(q, [(keys, pos, n_sink)], ref, D ** -0.5, None, q, fp)
    assert rel(logits, ref) < BOUND
    probs = torch.softmax(logits * 3, -1)
    mid, fp_out = kern.pool_values(probs, [(vals, pos, n_sink)], fp, 16)
    ref_mid, ref_fp = R.pool_values_reference(probs, [(vals, pos, n_sink)], fp)
    assert rel(mid, ref_mid) < BOUND and rel(fp_out, ref_fp) < BOUND


def test_pool_kernels_skip_empty_segments():
    g = gen(5)
    empty = quantize(randn(g, 1, 2, 0, 64, dtype=torch.float32), 4, 32, axis=-1)
    pos = torch.zeros(1, 2, 0, dtype=torch.int32, device=DEV)
    logits = torch.full((1, 4, 7), -7.0, device=DEV)
    q = randn(g, 1, 4, 64, dtype=torch.float32)
    kern.pool_scores(q, [(empty, pos, 0)], logits, 0.125, None, q, [(randn(g, 1, 2, 0, 64), 0)])
    assert (logits == -7.0).all()
    win = randn(g, 1, 2, 2, 64)                       # only a full-precision run: written, nothing else
    kern.pool_scores(q, [(empty, pos, 0)], logits, 0.125, None, q, [(win, 5)])
    assert (logits[..., :5] == -7.0).all() and (logits[..., 5:] != -7.0).all()
    probs = torch.softmax(logits, -1)
    mid, fp_out = kern.pool_values(probs, [(empty, pos, 0)], [(win, 5)], 4)
    assert torch.equal(mid, torch.zeros(1, 4, 64, device=DEV))
    expect = (probs[..., 5:].reshape(1, 2, 2, 2) @ win.float()).reshape(1, 4, 64)
    assert rel(fp_out, expect) < BOUND
    with pytest.raises(ValueError, match="importance codes must be"):
        kern.pool_values(probs, [(empty, pos, 0)], [(win, 5)], 4, importance=(torch.zeros(1, 2, 6, dtype=torch.uint8,
                                                                                          device=DEV), []))
    with pytest.raises(ValueError, match="at most 4"):
        kern.pool_scores(q, [(quantize(win.float(), 4, 32), pos.new_zeros(1, 2, 2), 0)] * 5, logits, 0.1)


@pytest.mark.parametrize("n,levels,block", [(1, 1, 1024), (37, 2, 1024), (1100, 4, 1024), (2053, 3, 1024),
                                            (9001, 4, 2048), (20000, 4, 1024), (40000, 3, 1024)])
def test_pool_positions_are_a_stable_argsort_of_the_levels(n, levels, block, monkeypatch):
    """Each pool's tokens listed in position order, pool after pool: what SmartKV's pools hold. Rows have equal
    counts per level (as cascade_assign guarantees); n spans several of the kernels' blocks (each sums the
    earlier blocks' level counts, 32 a step: two steps at 40000) and odd tails."""
    from smartkv.core.policy import pack_levels
    from smartkv.kernels import reference as R
    from smartkv.kernels import triton_pool

    _use(monkeypatch, positions={"block": block})

    g = gen(n)
    B, H = 2, 3
    counts = [n // levels] * levels
    counts[0] += n - sum(counts)
    base = torch.cat([torch.full((c,), i, dtype=torch.uint8) for i, c in enumerate(counts)])
    idx = torch.stack([torch.stack([base[torch.randperm(n, generator=g)] for _ in range(H)]) for _ in range(B)])
    packed = pack_levels(idx).to(DEV)
    got = kern.pool_positions(packed, n, counts)
    expect = torch.argsort(idx, dim=-1, stable=True).to(torch.int32)
    assert got.dtype == torch.int32 and got.shape == (B, H, n)
    assert torch.equal(got.cpu(), expect)
    assert torch.equal(R.pool_positions_reference(packed, n, counts).cpu(), expect)
    with pytest.raises(ValueError, match="counts"):
        kern.pool_positions(packed, n, counts + [1])
    # keys and values in one launch: each kind its own levels and counts
    counts2 = [n - n // 2, n // 2] if levels > 1 else [n]
    base2 = torch.cat([torch.full((c,), i, dtype=torch.uint8) for i, c in enumerate(counts2)])
    idx2 = torch.stack([torch.stack([base2[torch.randperm(n, generator=g)] for _ in range(H)]) for _ in range(B)])
    both = kern.pool_positions([packed, pack_levels(idx2).to(DEV)], n, [counts, counts2])
    assert both.shape == (2, B, H, n) and torch.equal(both[0].cpu(), expect)
    assert torch.equal(both[1].cpu(), torch.argsort(idx2, dim=-1, stable=True).to(torch.int32))
    with pytest.raises(ValueError, match="levels must be"):
        kern.pool_positions([packed] * 3, n, [counts] * 3)


@pytest.mark.parametrize("ranges", [[], [(0, 5)], [(3, 40), (90, 120)], [(0, 1), (2, 3), (10, 60), (70, 127)]])
def test_importance_update_kernel_matches_the_statistics(ranges):
    """One decode query's attention folded into the 8-bit importance codes: the kernel against
    smartkv.core.importance's running mean (codes within one step of 2^(1/8); nearly all equal)."""
    from smartkv.core.importance import decode_importance, encode_importance, seen_from_ranges
    from smartkv.kernels import reference as R

    g = gen(len(ranges))
    B, Hkv, NG, T = 2, 3, 3, 1000 + len(ranges)
    codes = torch.randint(0, 256, (B, Hkv, T), generator=g, dtype=torch.uint8)
    codes[..., :7] = 255                                                 # never attended
    probs = torch.softmax(torch.randn(B, Hkv * NG, T, generator=g) * 4, -1)
    got, ref = codes.clone().to(DEV), codes.clone()
    kern.importance_update(got, probs.to(DEV), ranges)
    R.importance_update_reference(ref, probs, ranges)
    seen = seen_from_ranges(torch.tensor(ranges, dtype=torch.int64).reshape(-1, 2), T).double()
    mass = probs.double().reshape(B, Hkv, NG, T).mean(2)
    exact = encode_importance((decode_importance(codes).double() * seen + mass) / (seen + 1))
    for out in (got.cpu(), ref):
        diff = (out.int() - exact.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01



@pytest.mark.parametrize("queries,divisor,per_token", [(1, 3, False), (4, 1, False), (1, 3, True), (1, 3, "uint8")])
def test_importance_fold_matches_the_running_mean(queries, divisor, per_token):
    """SmartKV's append classes and ring: codes of a mean over `seen` queries (one count for every token, or one a
    sequence and token, fp32 or a uint8 count up to 255) folded with the next queries' attention, in place on a view
    of a larger buffer (rows past it untouched): the kernel and the reference against the float64 mean (codes
    within one step of 2^(1/8); nearly all equal)."""
    from smartkv.core.importance import decode_importance, encode_importance
    from smartkv.kernels import reference as R

    g = gen(queries)
    B, Hkv, n, cap = 2, 3, 1500, 1600
    codes = torch.randint(0, 256, (B, Hkv, cap), generator=g, dtype=torch.uint8)
    codes[..., :7] = 255                                                 # never attended
    mass = torch.softmax(torch.randn(B, Hkv, cap, generator=g) * 4, -1) * queries * divisor
    seen = torch.tensor([37.0])
    if per_token:                                                        # sequences and tokens seen differently
        seen = torch.randint(0, 300, (B, n), generator=g).float()
        if per_token == "uint8":                                         # the ring's counts, 255 included
            seen = torch.randint(250, 256, (B, n), generator=g).to(torch.uint8)
    s = seen.double()[:, None, :] if per_token else 37.0
    exact = encode_importance((decode_importance(codes[..., :n]).double() * s + mass[..., :n].double() / divisor)
                              / (s + queries))
    got, ref = codes.clone().to(DEV), codes.clone()
    kern.importance_fold(got[..., :n], mass.to(DEV)[..., :n], seen.to(DEV), queries, divisor)
    R.importance_fold_reference(ref[..., :n], mass[..., :n], seen, queries, divisor)
    for out in (got.cpu(), ref):
        diff = (out[..., :n].int() - exact.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
        assert torch.equal(out[..., n:], codes[..., n:])
    assert (ref[..., :n] != codes[..., :n]).float().mean() > 0.2   # the fold changed many codes
    with pytest.raises(ValueError, match="codes must be uint8"):
        kern.importance_fold(got[..., :n].int(), mass.to(DEV)[..., :n], seen.to(DEV), queries)


def test_merge_plan_kernel_equals_the_reference():
    """One demotion move's row maps (SmartKV's append classes): k[b] flagged rows of class 2 go to class 1 (each class's
    rows are its positions in order; rows past a class's length exist and stay), on the first n positions of a
    wider 4-bit class map (n odd: the last byte's other position is not the scan's); the kernel's maps and class map
    equal the torch reference's, and the map changes at the k moved positions a row only."""
    from smartkv.kernels import reference as R
    from smartkv.methods.smartkv.classmap import pack_ids, unpack_ids

    g = gen(7)
    B, H, n, cap = 2, 3, 9501, 9600                                     # more than one of the kernel's blocks
    ids = torch.bucketize(torch.rand(B, H, cap, generator=g), torch.tensor([0.1, 0.4, 0.9])).to(torch.uint8)
    ids[..., n] = 2                                                     # class cid, but past the scan
    cmap = pack_ids(ids)
    cm = ids[..., :n]
    cid, tid = 2, 1
    n_c, n_t = (cm == cid).sum(-1), (cm == tid).sum(-1)
    k = torch.tensor([5, 40], dtype=torch.int32)
    Cc, Ct = int(n_c.max()) + 30, int(n_t.max()) + 40 + 25
    gone = torch.zeros(B, H, Cc + 1, dtype=torch.uint8)[..., :Cc]
    for b in range(B):
        for h in range(H):
            gone[b, h, torch.randperm(int(n_c[b, h]), generator=g)[:int(k[b])]] = 1
    ref_cm, got_cm = cmap.clone(), cmap.clone().to(DEV)
    ref = R.merge_plan_reference(ref_cm, n, gone, k, cid, tid, Ct)
    got = kern.merge_plan(got_cm, n, gone.to(DEV), k.to(DEV), cid, tid, Ct)
    after = unpack_ids(ref_cm)
    changed = after != ids
    assert torch.equal(got_cm.cpu(), ref_cm) and changed.sum() == H * int(k.sum()) and not changed[..., n:].any()
    assert bool((after[changed] == tid).all() and (ids[changed] == cid).all())
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a.cpu(), b)
    order = ref[0][0, 0, :int(n_t[0, 0]) + 5].tolist()                 # its own rows and the 5 moved ones, merged
    assert sorted(order) == list(range(int(n_t[0, 0]))) + [Ct + j for j in range(5)]
    with pytest.raises(ValueError, match="cmap and gone must be uint8"):
        kern.merge_plan(got_cm.int(), n, gone.to(DEV), k.to(DEV), cid, tid, Ct)


@pytest.mark.parametrize("dtype,F", [(torch.uint8, 32), (torch.float16, 2), (torch.uint8, 1)])
def test_move_rows_in_place_equals_gathering_a_copy(dtype, F):
    """A demotion move's rows, in place on the first rows of a larger buffer (more rows than one of the kernel's
    blocks): the class compacted (each sequence keeping its first n[b] rows' sources, rows past n[b] unchanged) and the
    target merged with fresh rows (its own rows and the moved ones interleaved in order), and sources in any order;
    the kernel and the reference equal a gather from a copy, and rows past the view are untouched."""
    from smartkv.kernels import reference as R

    g = gen(11)
    B, H, C, cap, k = 2, 3, 700, 760, 90

    def rand(*shape):
        t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return t if dtype == torch.uint8 else (torch.rand(*shape, generator=g) * 8).to(dtype)
    buf = rand(B, H, cap, F)
    gone = torch.rand(B, H, C, generator=g) < 0.3
    keep = torch.argsort(gone.to(torch.uint8), dim=-1, stable=True)                      # rows that stay first
    n = (C - gone.sum(-1)).min(-1).values.to(torch.int32)                               # per sequence
    own = torch.rand(B, H, C + k, generator=g).argsort(-1)[..., :C + k] < C              # C own rows, k fresh, mixed
    order = torch.where(own, own.cumsum(-1) - 1, C + (~own).cumsum(-1) - 1)[..., :C]     # merged order, first C rows
    fresh = rand(B, H, k, F)
    shuffle = torch.rand(B, H, C, generator=g).argsort(-1)                              # sources in any order
    for src, rows, fr in ((keep, n, None), (order, None, fresh), (shuffle, n, None)):
        want = buf.clone()
        full = torch.cat([buf[..., :C, :], fr], -2) if fr is not None else buf[..., :C, :]
        moved = full.gather(-2, src[..., None].expand(B, H, C, F))
        lim = C if rows is None else rows[:, None, None, None]
        want[..., :C, :] = torch.where(torch.arange(C)[:, None] < lim, moved, buf[..., :C, :])
        ref = buf.clone()
        R.move_rows_reference(ref[..., :C, :], src, rows, fr)
        got = buf.clone().to(DEV)
        kern.move_rows(got[..., :C, :], src.to(DEV), None if rows is None else rows.to(DEV),
                       None if fr is None else fr.to(DEV))
        assert torch.equal(ref, want) and torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match="src must be int64"):
        kern.move_rows(buf[..., :C, :], keep.int())


def test_importance_update_with_many_ranges_takes_the_reference_path():
    from smartkv.kernels import reference as R

    g = gen(3)
    codes = torch.randint(0, 256, (1, 2, 300), generator=g, dtype=torch.uint8)
    probs = torch.softmax(torch.randn(1, 4, 300, generator=g), -1)
    ranges = [(i * 20, i * 20 + 5) for i in range(6)]                   # more than the kernel's 4
    got, ref = codes.clone().to(DEV), codes.clone()
    kern.importance_update(got, probs.to(DEV), ranges)
    R.importance_update_reference(ref, probs, ranges)
    assert torch.equal(got.cpu(), ref) and not torch.equal(ref, codes)
