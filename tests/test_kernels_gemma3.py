"""Gemma 3's attention shape in the decode kernels (head_dim 256, one KV head, 4 query heads per KV head): which
calls the kernels take and which fall back to torch with a logged reason, and that the kernels give the
reference's numbers there (on CUDA, or through Triton's CPU interpreter; bounds as in test_kernels.py)."""
import logging

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py puts Triton in its interpreter on machines without a GPU

import smartkv.kernels as kern  # noqa: E402
from smartkv import cache_kwargs  # noqa: E402
from smartkv.core.quant import quantize  # noqa: E402
from smartkv.kernels import KVSegment  # noqa: E402
from smartkv.kernels import reference as R  # noqa: E402
from smartkv.kernels.split import triton_problem  # noqa: E402
from smartkv.kernels.triton_pool import pool_problem  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D, HKV, NG, B = 256, 1, 4, 2
BOUND = 3e-3


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randn(seed, *shape, scale=1.0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def _segments(T):
    """int8, int4, KIVI 2/4 (per-channel keys, full-precision residual) and SmartKV-like groups of 64."""
    k, v = randn(1, B, HKV, T, D, scale=2.0, dtype=torch.float32), randn(2, B, HKV, T, D, dtype=torch.float32)
    res_k, res_v = randn(3, B, HKV, 5, D), randn(4, B, HKV, 5, D)
    return {"int8": [KVSegment(quantize(k, 8, 32), quantize(v, 8, 32))],
            "int4": [KVSegment(quantize(k, 4, 32), quantize(v, 4, 32))],
            "kivi": [KVSegment(quantize(k, 2, 32, axis=-2), quantize(v, 4, 32), res_k, res_v)],
            "groups64": [KVSegment(quantize(k, 4, 64), quantize(v, 2, 64))]}


@pytest.mark.parametrize("name", ["int8", "int4", "kivi", "groups64"])
def test_decode_kernel_takes_gemma3_shapes_and_matches_the_reference(name):
    segments = _segments(64)[name]
    q = randn(5, B, HKV * NG, 1, D)
    assert triton_problem(q, segments) is None
    if not kern.kernels_available(DEV):
        pytest.skip("no Triton kernels on this device")
    got = kern.decode_attention(q, segments, D ** -0.5)
    exact = kern.decode_attention_reference(q, segments, D ** -0.5, compute_dtype=torch.float64)
    assert got.shape == q.shape and rel(got, exact) < BOUND


def test_pool_kernels_take_gemma3_widths_but_3_bit_in_groups_of_64():
    """SmartKV's default groups of 64 make 4 groups per token at head_dim 256: the 2-, 4- and 8-bit pools take the
    kernels, the 3-bit one does not (Triton 3.6 fails to compile it for sm_90), groups of 128 do."""
    x = randn(6, B, HKV, 8, D, dtype=torch.float32)
    for bits in (2, 4, 8):
        assert pool_problem(quantize(x, bits, 64)) is None
    assert "3-bit pools" in pool_problem(quantize(x, 3, 64))
    assert pool_problem(quantize(x, 3, 128)) is None


def test_fallbacks_are_logged_with_their_reason_and_give_the_reference(caplog):
    if not kern.kernels_available(DEV):
        pytest.skip("no Triton kernels on this device: nothing to fall back from")
    kern.fallback.cache_clear()
    N, n_sink = 24, 2
    pos = torch.arange(N, dtype=torch.int32).expand(B, HKV, N).contiguous().to(DEV)
    pools = [(quantize(randn(7, B, HKV, N, D, dtype=torch.float32), 3, 64), pos, n_sink)]
    fp = [(randn(8, B, HKV, n_sink, D), 0)]
    q = randn(9, B, HKV * NG, D, dtype=torch.float32)
    logits, ref = (torch.zeros(B, HKV * NG, n_sink + N, device=DEV) for _ in range(2))
    with caplog.at_level(logging.WARNING, logger="smartkv.kernels"):
        kern.pool_scores(q, pools, logits, D ** -0.5, None, q, fp)
        kern.pool_scores(q, pools, logits, D ** -0.5, None, q, fp)
        odd = randn(10, B, HKV * NG, 1, 48)
        seg = [KVSegment(randn(11, B, HKV, 7, 48), randn(12, B, HKV, 7, 48))]
        out = kern.decode_attention(odd, seg, 48 ** -0.5)
    R.pool_scores_reference(q, pools, ref, D ** -0.5, None, q, fp)
    assert torch.equal(logits, ref)
    assert rel(out, kern.decode_attention_reference(odd, seg, 48 ** -0.5)) < BOUND
    messages = [r.getMessage() for r in caplog.records]
    assert sum("pool_scores" in m and "3-bit pools" in m for m in messages) == 1   # once per reason
    assert any("decode_attention" in m and "power of two" in m for m in messages)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,params", [("int8", {}), ("int4", {}), ("kivi", dict(residual_length=32)),
                                           ("smartkv", dict(budget=4, recent_window=8, realloc_every=8))])
def test_fused_decode_on_the_hybrid_model_matches_the_reference_path(monkeypatch, caplog, method, params, dtype):
    """tiny-gemma3 (head_dim 256, one KV head): the full-attention layer decodes through the kernels, the sliding
    ones through the reference path; logits as with use_kernels=False, to fp16-operand accuracy. A launch that
    does not fit the card (on an H200: int8's wide per-token config with fp32 operands at head_dim 256) takes the
    reference path with a logged reason instead of failing."""
    import smartkv
    import smartkv.cache.layer as cache_mod
    from smartkv.models import load_tiny

    if not kern.kernels_available(DEV):
        pytest.skip("no Triton kernels on this device")
    if DEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 is the fp32 case again, slower")
    monkeypatch.setattr(cache_mod, "FORCE_KERNELS", True)
    caplog.set_level(logging.WARNING, logger="smartkv.kernels")
    model = load_tiny("tiny-gemma3", seed=0, device=DEV, dtype=dtype).model
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(0)).to(DEV)
    out = {}
    for use_kernels in (True, False):
        cache = smartkv.make_cache(method, model, use_kernels=use_kernels, **params)
        with torch.inference_mode():
            steps = [model(ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]]
            for t in range(6 if DEV == "cuda" else 3):   # the interpreter: 3 steps cover it at half the time
                tok = torch.tensor([[10 + t]], device=DEV)
                steps.append(model(tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1])
        out[use_kernels] = torch.stack(steps)
        assert [layer.fused for layer in cache.layers] == [False] * 5 + [use_kernels]
    assert rel(out[True], out[False]) < (1e-2 if dtype == torch.float32 else 3e-2)
    if dtype == torch.bfloat16:   # the dtype a GPU model runs in: the decode kernel fits
        assert not any("decode_attention" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error", ["resources", "passes"])
def test_a_launch_that_does_not_fit_falls_back_once(error, monkeypatch, caplog):
    """OutOfResources at the first launch, or a compile failing in Triton's passes (Triton 3.6, H100, some head_dim-256
    group mixes): logged once, the reference's result, no second attempt. Another RuntimeError propagates."""
    from smartkv.kernels import split as dec

    if not kern.kernels_available(DEV):
        pytest.skip("no Triton kernels on this device")
    calls = []

    def too_big(*args, **kwargs):
        calls.append(1)
        if error == "passes":
            raise RuntimeError("PassManager::run failed")
        raise kern.OutOfResources(286720, 232448, "shared memory")

    monkeypatch.setattr(dec, "decode_attention_triton", too_big)
    monkeypatch.setattr(kern, "_TOO_BIG", {})
    kern.fallback.cache_clear()
    segments = _segments(32)["int8"]
    q = randn(13, B, HKV * NG, 1, D, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="smartkv.kernels"):
        outs = [kern.decode_attention(q, segments, D ** -0.5) for _ in range(3)]
    ref = kern.decode_attention_reference(q, segments, D ** -0.5)
    assert all(torch.equal(o, ref) for o in outs) and len(calls) == 1
    assert [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()] != []
    assert len(caplog.records) == 1
    monkeypatch.setattr(kern, "_TOO_BIG", {})
    def cuda_error(*args, **kwargs):
        raise RuntimeError("CUDA error")
    monkeypatch.setattr(dec, "decode_attention_triton", cuda_error)
    with pytest.raises(RuntimeError, match="CUDA error"):
        kern.decode_attention(q, segments, D ** -0.5)
