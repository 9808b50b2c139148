"""The CUDA decode-attention kernels (smartkv.kernels.cuda_attn) against the fp32 torch reference.

The GPU tests skip without CUDA (benchmarks/fast_gpu.sh runs them on the GPU machine); the planner and the
dispatch rules run everywhere. Bound: ||out - ref|| / ||ref|| <= 3e-3 (fp16 operands on the tensor cores: the
query, and p times the value scale), as for the Triton kernels.
"""
import pytest
import torch

import smartkv.kernels as kern
from smartkv.core.quant import quantize
from smartkv.kernels import KVSegment, cuda_attn, decode_attention_reference, tuning

BOUND = 3e-3
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _small_caches_too(monkeypatch):
    """The shapes here are small: take the fast path below its size threshold as well."""
    with tuning.override(cuda={"min_tokens": 0}):
        yield


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rand(g, *shape, scale=1.0, shift=0.0, dtype=torch.float16):
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to("cuda")


def check(q, segs, lengths=None, bound=BOUND):
    """The output against the reference; then the same call with token probabilities (the kernels write each
    token's logit): the same output, and probabilities within BOUND of the fp64 reference's."""
    before = cuda_attn.PATHS["fast"]
    out = kern.decode_attention(q, segs, 0.0883883, lengths)
    assert cuda_attn.PATHS["fast"] == before + 1, dict(cuda_attn.PATHS)
    ref = decode_attention_reference(q, segs, 0.0883883, lengths)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = rel(out, ref)
    assert err < bound, err
    out2, probs = kern.decode_attention(q, segs, 0.0883883, lengths, return_token_probs=True)
    assert cuda_attn.PATHS["fast"] == before + 2, dict(cuda_attn.PATHS)
    assert rel(out2, out) < 1e-6
    _, exact = decode_attention_reference(q, segs, 0.0883883, lengths, return_token_probs=True,
                                          compute_dtype=torch.float64)
    for p, pe in zip(probs, exact, strict=True):
        assert p.shape == pe.shape and torch.isfinite(p).all()
        assert rel(p, pe) < BOUND, rel(p, pe)
    return out


def uniform(g, bits, B, H, T, D, new=1, kscale=2.0, vscale=1.0, group=32):
    k = quantize(rand(g, B, H, T, D, scale=kscale, shift=0.3), bits, group)
    v = quantize(rand(g, B, H, T, D, scale=vscale, shift=-0.2), bits, group)
    res = (rand(g, B, H, new, D), rand(g, B, H, new, D)) if new else (None, None)
    return KVSegment(k, v, *res)


@cuda
@pytest.mark.parametrize("bits", [4, 8, 2, 3])
@pytest.mark.parametrize("B,T,NG,D", [(2, 1000, 4, 128), (3, 4133, 4, 128), (1, 77, 8, 128), (2, 2048, 1, 64),
                                      (2, 3000, 2, 64)])
def test_uniform_per_token(bits, B, T, NG, D):
    g = torch.Generator().manual_seed(bits * 1000 + T)
    H = 2
    q = rand(g, B, H * NG, D)
    if bits == 3 and D == 64:   # 24-byte rows: the Triton kernels take it
        assert "3-bit" in cuda_attn.unsupported(q, [uniform(g, bits, B, H, T, D)])
        return
    check(q, [uniform(g, bits, B, H, T, D)])


@cuda
@pytest.mark.parametrize("kb,vb", [(4, 4), (8, 2), (2, 8), (3, 2), (8, 3), (3, 3)])
@pytest.mark.parametrize("B,T,NG", [(2, 3000, 4), (1, 77, 8)])
def test_per_token_groups_of_64(kb, vb, B, T, NG):
    """SmartKV's layout (one scale and zero per 64 channels at head_dim 128, key and value widths apart, key
    normalisation): the same kernel with each 32-channel dot scaled by its 64-channel group's scale."""
    g = torch.Generator().manual_seed(kb * 100 + vb * 10 + T)
    H, D = 2, 128
    k = quantize(rand(g, B, H, T, D, scale=2.0, shift=0.3), kb, 64)
    v = quantize(rand(g, B, H, T, D), vb, 64)
    mu, sd = rand(g, B, H, 1, D), rand(g, B, H, 1, D).abs() + 0.5
    segs = [KVSegment(rand(g, B, H, 4, D), rand(g, B, H, 4, D)),
            KVSegment(k, v, rand(g, B, H, 1, D), rand(g, B, H, 1, D), key_scale=sd, key_shift=mu)]
    check(rand(g, B, H * NG, D), segs)
    # head_dim 64 with groups of 64: one scale a token, which the kernel's 4-byte scale copies do not take
    seg64 = KVSegment(quantize(rand(g, 1, 2, 500, 64), 4, 64), quantize(rand(g, 1, 2, 500, 64), 4, 64))
    assert "group size" in cuda_attn.unsupported(rand(g, 1, 8, 64), [seg64])
    seg3 = KVSegment(quantize(rand(g, 1, 2, 500, 64), 3, 32), quantize(rand(g, 1, 2, 500, 64), 4, 32))
    assert "3-bit keys" in cuda_attn.unsupported(rand(g, 1, 8, 64), [seg3])   # 24-byte rows: no 16-byte copies


@cuda
def test_no_residual_bf16_query_and_4d_query():
    g = torch.Generator().manual_seed(5)
    seg = uniform(g, 4, 2, 8, 5000, 128, new=0)
    q = rand(g, 2, 32, 1, 128, dtype=torch.bfloat16)
    out = check(q, [seg], bound=1e-2)
    assert out.shape == (2, 32, 1, 128)


@cuda
@pytest.mark.parametrize("kb,vb", [(2, 2), (2, 4), (4, 4)])
@pytest.mark.parametrize("Tk,Tv,T", [(4096, 4000, 4128), (64, 32, 200), (0, 0, 100), (8192, 8192, 8192)])
def test_kivi_windows(kb, vb, Tk, Tv, T):
    g = torch.Generator().manual_seed(Tk + T + kb)
    B, H, D = 2, 4, 128
    x = rand(g, B, H, T, D, scale=2.0) + torch.linspace(-3, 3, D, device="cuda", dtype=torch.float16)
    v = rand(g, B, H, T, D)
    if Tk == 0:
        segs = [KVSegment(x, v)]  # a full-precision segment alone: not for this path
        q = rand(g, B, 4 * H, D)
        assert cuda_attn.unsupported(q, segs) == "no quantized segment"
        return
    qk = quantize(x[:, :, :Tk], kb, 32, axis=-2)
    qv = quantize(v[:, :, :Tv], vb, 32)
    seg = KVSegment(qk, qv, x[:, :, Tk:] if T > Tk else None, v[:, :, Tv:] if T > Tv else None)
    check(rand(g, B, 4 * H, D), [seg])


@cuda
def test_ragged_lengths_and_static_residual_last():
    g = torch.Generator().manual_seed(7)
    B, H, C, D = 3, 8, 3000, 128
    seg = uniform(g, 4, B, H, C, D, new=0)
    lengths = torch.tensor([3000, 1, 1777], device="cuda")
    q = rand(g, B, 32, D)
    check(q, [seg], lengths)
    # a static decode step: the residual stands for token lengths[b] - 1 of a whole-capacity buffer
    static = KVSegment(seg.keys, seg.values, rand(g, B, H, 1, D), rand(g, B, H, 1, D),
                       lengths=torch.tensor([2999, 1, 1777], device="cuda", dtype=torch.int32), residual_last=True)
    check(q, [static])


@cuda
def test_several_segments_key_normalisation_and_full_precision_runs():
    g = torch.Generator().manual_seed(11)
    B, H, D = 2, 8, 128
    mu, sd = rand(g, B, H, 1, D), rand(g, B, H, 1, D).abs() + 0.5
    segs = [KVSegment(rand(g, B, H, 4, D), rand(g, B, H, 4, D))]
    for bits, n in ((8, 700), (4, 900), (2, 1500)):
        k = quantize(rand(g, B, H, n, D), bits, 32)
        segs.append(KVSegment(k, quantize(rand(g, B, H, n, D), bits, 32), key_scale=sd, key_shift=mu))
    segs.append(KVSegment(rand(g, B, H, 32, D), rand(g, B, H, 32, D)))
    check(rand(g, B, 32, D), segs, torch.tensor([3136, 2000], device="cuda"))


@cuda
@pytest.mark.parametrize("fold_window", [False, True])
def test_importance_folded_in_the_pass_on_the_fast_path(fold_window):
    """`decode_attention(fold=..., lse_io=...)` on the CUDA kernels (SmartKV's append classes with
    class_norm="previous"): codes within one step of the reference's fold, tokens past a pool's length untouched,
    lse_io the query's log2-sum-exp, the output unchanged; fold_window: a full-precision segment folds too (the
    tail warps' path)."""
    g = torch.Generator().manual_seed(29)
    B, H, D, NG = 2, 8, 128, 4
    mu, sd = rand(g, B, H, 1, D), rand(g, B, H, 1, D).abs() + 0.5
    segs = [KVSegment(rand(g, B, H, 4, D), rand(g, B, H, 4, D))]
    for bits, n in ((4, 900), (2, 1500)):
        k = quantize(rand(g, B, H, n, D), bits, 32)
        segs.append(KVSegment(k, quantize(rand(g, B, H, n, D), bits, 32), key_scale=sd, key_shift=mu))
    lens = torch.tensor([900, 613], device="cuda", dtype=torch.int32)
    segs[1] = KVSegment(segs[1].keys, segs[1].values, key_scale=sd, key_shift=mu, lengths=lens)
    segs.append(KVSegment(rand(g, B, H, 32, D), rand(g, B, H, 32, D)))
    q = rand(g, B, H * NG, D)
    folded = segs[1:] if fold_window else segs[1:3]
    codes = [torch.randint(0, 256, (B, H, s.num_tokens + 3), generator=g, dtype=torch.uint8).cuda() for s in folded]
    seen = torch.tensor([11.0], device="cuda")

    def fold(cs):
        return [None, *((c, seen) for c in cs)] + [None] * (len(segs) - 1 - len(cs))
    lse = torch.zeros(B, H * NG, device="cuda")
    kern.decode_attention_reference(q, segs, 0.0883883, fold=fold([c.clone() for c in codes]), lse_io=lse)
    got, ref = [c.clone() for c in codes], [c.clone() for c in codes]
    lse_g, lse_r = lse - 0.5, lse - 0.5
    before = cuda_attn.PATHS["fast"]
    out = kern.decode_attention(q, segs, 0.0883883, fold=fold(got), lse_io=lse_g)
    assert cuda_attn.PATHS["fast"] == before + 1, dict(cuda_attn.PATHS)
    out_r = decode_attention_reference(q, segs, 0.0883883, fold=fold(ref), lse_io=lse_r)
    assert rel(out, out_r) < BOUND and (lse_g - lse).abs().max() < 2e-2
    for c, a, r in zip(codes, got, ref):
        assert (a.int() - r.int()).abs().max() <= 1 and not torch.equal(a, c)
    assert torch.equal(got[0][1, :, 613:], codes[0][1, :, 613:])


@cuda
def test_large_values_and_constant_groups():
    g = torch.Generator().manual_seed(13)
    x = rand(g, 1, 8, 2048, 128, scale=3.0)
    x[0, 1, 100:200] = 0.25              # constant groups: scale 0
    x[0, 2, :, 7] = 1e4                  # a large channel
    v = rand(g, 1, 8, 2048, 128, scale=20.0)
    v[0, 3, 5:9] = 3e4
    seg = KVSegment(quantize(x, 4, 32), quantize(v, 4, 32))
    check(rand(g, 1, 32, 128, scale=0.05), [seg])


@cuda
def test_cuda_graph_replay_matches_eager():
    g = torch.Generator().manual_seed(17)
    seg = uniform(g, 4, 2, 8, 4096, 128)
    q = rand(g, 2, 32, 128)
    eager = kern.decode_attention(q, [seg], 0.09)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern.decode_attention(q, [seg], 0.09)
    q.copy_(rand(g, 2, 32, 128))
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, kern.decode_attention(q, [seg], 0.09)) < 1e-6
    assert rel(out, eager) > 1e-2  # the replay read the new query
    # captured before any eager call made the merge's arrival counters: the separate merge kernel, same numbers
    cuda_attn._COUNTERS.clear()
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        out2 = kern.decode_attention(q, [seg], 0.09)
    graph2.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert not cuda_attn._COUNTERS and rel(out2, out) < 1e-6


@cuda
def test_token_probs_accumulate_and_replay():
    """SmartKV folds each step's token probabilities into its importance: `probs_out` accumulates them, also
    inside a captured graph, and rows past a sequence's length get 0."""
    g = torch.Generator().manual_seed(29)
    B, H, T = 2, 8, 3000
    seg = uniform(g, 4, B, H, T, 128, new=0)
    lengths = torch.tensor([3000, 1234], device="cuda")
    q = rand(g, B, 32, 128)
    acc = [torch.ones(B, H, T, device="cuda")]
    _, probs = kern.decode_attention(q, [seg], 0.09, lengths, return_token_probs=True, probs_out=acc)
    _, ref = decode_attention_reference(q, [seg], 0.09, lengths, return_token_probs=True)
    assert probs[0] is acc[0] and rel(acc[0] - 1, ref[0]) < BOUND
    assert (acc[0][1, :, 1234:] == 1).all()
    torch.testing.assert_close((acc[0] - 1).sum(-1), torch.full((B, H), 4.0, device="cuda"), rtol=1e-3, atol=1e-3)
    acc[0].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kern.decode_attention(q, [seg], 0.09, lengths, return_token_probs=True, probs_out=acc)
    acc[0].zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert rel(acc[0], 2 * ref[0]) < BOUND


@cuda
def test_probabilities_fold_into_codes_on_the_fast_path_and_in_a_graph():
    """`FoldInto` through the CUDA kernels: a ring-like 4-bit segment with lengths and a full-precision window, each
    folded into codes and counts as the reference folds its probabilities (codes within one step of rounding,
    counts exact); captured in a graph, each replay folds one more query."""
    from smartkv.kernels.reference import importance_fold_reference
    g = torch.Generator().manual_seed(31)
    B, H, NG, D = 2, 8, 4, 128
    ring = uniform(g, 4, B, H, 700, D, new=0)
    ring = KVSegment(ring.keys, ring.values, lengths=torch.tensor([700, 333], device="cuda"))
    win = KVSegment(rand(g, B, H, 40, D), rand(g, B, H, 40, D))
    q = rand(g, B, H * NG, D)
    codes = [torch.randint(0, 256, (B, H, n), generator=g, dtype=torch.uint8).cuda() for n in (700, 40)]
    seen = [torch.randint(0, 250, (B, n), generator=g, dtype=torch.uint8).cuda() for n in (700, 40)]

    def want(reps):
        c, s = [x.clone() for x in codes], [x.clone() for x in seen]
        _, probs = decode_attention_reference(q, [ring, win], 0.0883883, return_token_probs=True)
        for _ in range(reps):
            for cc, ss, p, n in zip(c, s, probs, ([700, 333], [40, 40])):
                importance_fold_reference(cc, p, ss, 1, NG)
                ss += (torch.arange(ss.shape[-1], device="cuda") < torch.tensor(n, device="cuda")[:, None]).byte()
        return c, s

    def call(c, s):
        return kern.decode_attention(q, [ring, win], 0.0883883, return_token_probs=True,
                                     probs_out=[kern.FoldInto(cc, ss, NG) for cc, ss in zip(c, s)])

    before = cuda_attn.PATHS["fast"]
    got_c, got_s = [x.clone() for x in codes], [x.clone() for x in seen]
    assert call(got_c, got_s)[1] == [None, None] and cuda_attn.PATHS["fast"] == before + 1
    for a, b, s, t in zip(got_c, *want(1), got_s):
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 0.05 and torch.equal(s, t)
    got_c, got_s = [x.clone() for x in codes], [x.clone() for x in seen]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(got_c, got_s)
    for c, s, c0, s0 in zip(got_c, got_s, codes, seen):
        c.copy_(c0)
        s.copy_(s0)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for a, b, s, t in zip(got_c, *want(2), got_s):
        assert (a.int() - b.int()).abs().max() <= 2 and torch.equal(s, t)


@cuda
def test_fallbacks_say_why_and_stay_correct():
    g = torch.Generator().manual_seed(19)
    k = quantize(rand(g, 1, 2, 500, 128), 4, 16)
    seg = KVSegment(k, quantize(rand(g, 1, 2, 500, 128), 4, 16))
    q = rand(g, 1, 8, 128)
    assert "group size" in cuda_attn.unsupported(q, [seg])
    ref = decode_attention_reference(q, [seg], 0.1)
    assert rel(kern.decode_attention(q, [seg], 0.1), ref) < BOUND
    assert cuda_attn.PATHS[cuda_attn.unsupported(q, [seg])] >= 1


@cuda
def test_small_caches_take_the_triton_path():
    g = torch.Generator().manual_seed(23)
    seg = uniform(g, 4, 2, 8, 4000, 128)
    q = rand(g, 2, 32, 128)
    with tuning.override(cuda={"min_tokens": 16384}):
        assert "fewer than 16384" in cuda_attn.unsupported(q, [seg])
        assert rel(kern.decode_attention(q, [seg], 0.1), decode_attention_reference(q, [seg], 0.1)) < BOUND
        assert cuda_attn.unsupported(q, [uniform(g, 4, 2, 8, 9000, 128)]) is None


def test_unsupported_off_cuda_and_by_switch(monkeypatch):
    k = quantize(torch.randn(1, 2, 64, 128), 4, 32)
    seg = KVSegment(k, k)
    assert "CUDA" in cuda_attn.unsupported(torch.randn(1, 8, 128), [seg])
    monkeypatch.setenv("SMARTKV_FAST_ATTN", "0")
    assert cuda_attn.unsupported(torch.randn(1, 8, 128), [seg]) == "SMARTKV_FAST_ATTN=0"


def test_plan_fills_whole_waves():
    # 64 sequence-heads of 1024 stages, 264 blocks at once: 4 blocks each (256 blocks, one wave)
    n, per_warp = cuda_attn.plan_blocks(1024, 64, 264)
    assert n * 64 <= 264 and n * 4 * per_warp >= 1024 and n == 4
    # few sequences: more blocks each, down to one stage per warp
    assert cuda_attn.plan_blocks(3, 8, 264) == (1, 1)
    assert cuda_attn.plan_blocks(128, 8, 264)[0] == 32


def test_shared_memory_formula_matches_the_kernel_source():
    # the .cu file and the host compute the block's shared memory apart; the kernel traps on a shortfall
    src = cuda_attn.SOURCE.read_text()
    assert "SMEM_BYTES = Q_BYTES + NW * WARP_BYTES" in src and "__trap()" in src
    assert cuda_attn.smem_bytes(128, 1, 4, 4, 4, 3) == 78032
