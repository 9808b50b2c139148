"""The fused demotion of SmartKV's append classes (kernels.demotion_keys, requantize_rows, move_rows over a list):
each kernel gives what its torch path gives, bit for bit (the ordering of rows by weight and the re-quantized bytes
must not depend on the device), and the torch paths compute what the demotion means: weights as documented,
rows dequantized and quantized again, every tensor's rows moved by one map."""
import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py puts Triton in its interpreter on machines without a GPU

import smartkv.kernels as kern  # noqa: E402
from smartkv.core.importance import decode_importance  # noqa: E402
from smartkv.core.quant import QTensor, dequantize, quantize, token_ranges  # noqa: E402
from smartkv.kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _pool(g, B, H, C, D, bits, group):
    x = torch.randn(B, H, C, D, generator=g) * torch.rand(B, H, C, 1, generator=g) * 3
    return quantize(x, bits, group, axis=-1)


def _to(q: QTensor, dev) -> QTensor:
    return QTensor(q.codes.to(dev), q.scale.to(dev), q.zero.to(dev), q.bits, q.group_size, q.axis)


@pytest.mark.parametrize("power,sensitivity", [(2, True), (1, True), (0, False), (1.5, True)])
def test_demotion_keys_order_rows_by_their_weight(power, sensitivity):
    """Keys = the fp32 weight's bits << 32 | row, +inf past the class's length; the weight (importance + floor)^power
    x ((k range x kmul)^2 + (v range)^2) within fp32 rounding of float64 arithmetic; kernel == torch, bit for bit."""
    g = torch.Generator().manual_seed(5)
    B, H, C, D = 2, 3, 300, 64
    kq, vq = _pool(g, B, H, C, D, 4, 32), _pool(g, B, H, C, D, 2, 32)
    codes = torch.randint(0, 256, (B, H, C), generator=g, dtype=torch.uint8)
    codes[..., ::7] = 255                                             # never attended: importance 0
    codes[..., 1::9] = codes[..., 2::9][..., :codes[..., 1::9].shape[-1]]   # ties in importance
    length = torch.tensor([C - 17, 250], dtype=torch.int32)
    floor = torch.rand(B, H, generator=g) * 1e-3
    kmul = torch.rand(B, H, generator=g) + 0.5
    ref = R.demotion_keys_reference(codes, kq, vq, length, floor, kmul, power, sensitivity)
    got = kern.demotion_keys(codes.to(DEV), _to(kq, DEV), _to(vq, DEV), length.to(DEV), floor.to(DEV),
                             kmul.to(DEV), power, sensitivity)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), ref)
    rows = torch.arange(C)
    assert torch.equal(ref & 0xFFFFFFFF, rows.expand(B, H, C))
    w = (ref >> 32).int().view(torch.float32)
    past = (rows >= length[:, None, None]).expand(B, H, C)
    assert bool(torch.isinf(w[past]).all()) and not torch.isinf(w[~past]).any()
    want = (decode_importance(codes).double() + floor.double()[..., None]) ** power
    if sensitivity:
        want = want * ((token_ranges(kq).double() * kmul.double()[..., None]) ** 2 + token_ranges(vq).double() ** 2)
    torch.testing.assert_close(w[~past].double(), want[~past], rtol=2e-6, atol=0)


@pytest.mark.parametrize("src_bits,dst_bits", [((4, 3), (4, 2)), ((8, 3), (3, 2)), ((8, 4), (4, 2))])
def test_requantize_rows_takes_the_leaving_rows_to_the_targets_widths(src_bits, dst_bits):
    """Rows j < k[b] are the class's rows keep[C - k[b] + j] (the flagged ones, in row order), dequantized and
    quantized again at the target's widths (core's bytes), with their importance codes; kernel == torch."""
    g = torch.Generator().manual_seed(9)
    B, H, C, D, k_max = 2, 3, 120, 64, 40
    kq, vq = (_pool(g, B, H, C, D, b, 32) for b in src_bits)
    codes = torch.randint(0, 256, (B, H, C), generator=g, dtype=torch.uint8)
    k = torch.tensor([33, 7], dtype=torch.int32)
    gone = torch.zeros(B, H, C, dtype=torch.uint8)
    for b in range(B):
        for h in range(H):
            gone[b, h, torch.randperm(C - 10, generator=g)[:int(k[b])]] = 1
    keep = torch.argsort(gone, dim=-1, stable=True)
    rk, rv, rimp = R.requantize_rows_reference(kq, vq, codes, keep, k, k_max, dst_bits)
    gk, gv, gimp = kern.requantize_rows(_to(kq, DEV), _to(vq, DEV), codes.to(DEV), keep.to(DEV), k.to(DEV), k_max,
                                        dst_bits)
    for b in range(B):
        n = int(k[b])
        for got, ref in ((gk, rk), (gv, rv)):
            assert got.bits == ref.bits and got.codes.shape == ref.codes.shape
            for f in ("codes", "scale", "zero"):
                assert torch.equal(getattr(got, f)[b, :, :n].cpu(), getattr(ref, f)[b, :, :n])
        assert torch.equal(gimp[b, :, :n].cpu(), rimp[b, :, :n])
        for h in range(H):
            rows = gone[b, h].nonzero().squeeze(1)                      # the flagged rows, in row order
            assert torch.equal(rimp[b, h, :n], codes[b, h, rows])
            for q, r, bits in ((kq, rk, dst_bits[0]), (vq, rv, dst_bits[1])):
                x = dequantize(QTensor(q.codes[b, h, rows], q.scale[b, h, rows], q.zero[b, h, rows], q.bits, 32, -1))
                want = quantize(x, bits, 32, axis=-1)
                assert torch.equal(r.codes[b, h, :n], want.codes) and torch.equal(r.scale[b, h, :n], want.scale)


def test_moving_a_list_of_tensors_equals_moving_each():
    """A class's tensors of different dtypes and widths (codes, scales, importance) moved by one map in one launch a
    pass: the same rows as moving each by itself, with fresh rows and a per-sequence row limit."""
    g = torch.Generator().manual_seed(4)
    B, H, C, k = 2, 3, 200, 25
    xs = [torch.randint(0, 256, (B, H, C, 24), generator=g, dtype=torch.uint8),
          torch.randn(B, H, C, 2, generator=g).half(), torch.randn(B, H, C, 4, generator=g).half(),
          torch.randint(0, 256, (B, H, C, 1), generator=g, dtype=torch.uint8)]
    fresh = [torch.zeros(B, H, k, x.shape[-1], dtype=x.dtype).random_(0, 100, generator=g) for x in xs]
    own = torch.rand(B, H, C + k, generator=g).argsort(-1) < C
    order = torch.where(own, own.cumsum(-1) - 1, C + (~own).cumsum(-1) - 1)[..., :C]
    n = torch.tensor([C - 3, C - 40], dtype=torch.int32)
    for src, rows, fr in ((order, n, fresh), (torch.rand(B, H, C, generator=g).argsort(-1), None, None)):
        want = [x.clone() for x in xs]
        for i, x in enumerate(want):
            R.move_rows_reference(x, src, rows, None if fr is None else fr[i])
        got = [x.clone().to(DEV) for x in xs]
        kern.move_rows(got, src.to(DEV), None if rows is None else rows.to(DEV),
                       None if fr is None else [f.to(DEV) for f in fr])
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
        assert not torch.equal(want[0], xs[0])
    with pytest.raises(ValueError, match="fresh must hold one tensor"):
        kern.move_rows(xs, order, None, fresh[:2])


def test_importance_sum_adds_each_rows_decoded_codes_up_to_its_length():
    """The demotion floor's sum: per (sequence, KV head) row, the decoded importance of the first length[b] codes,
    stored or added; codes past the length (and code 255) add nothing. Against the decoded codes summed in
    float64."""
    g = torch.Generator().manual_seed(5)
    B, H, C = 3, 2, 1300
    codes = torch.randint(0, 256, (B, H, C), generator=g, dtype=torch.uint8).to(DEV)
    length = torch.tensor([C, 611, 0], dtype=torch.int32, device=DEV)
    want = torch.stack([decode_importance(codes[b, :, :n].cpu()).double().sum(-1)
                        for b, n in enumerate(length.tolist())])
    out = torch.full((B, H), 7.0, device=DEV)
    for fn in (kern.importance_sum, R.importance_sum_reference):
        got = fn(codes, length, out.clone(), False)
        assert torch.allclose(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
        got = fn(codes, length, out.clone(), True)
        assert torch.allclose(got.cpu().double(), want + 7.0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="length \\(B,\\) int32"):
        kern.importance_sum(codes, length.long(), out)
