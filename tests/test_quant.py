"""Quantization primitives: round-trip bounds, grid values exact, packing identity, edge cases."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smartkv.core.quant import BITS, dequantize, pack, quantize, take_rows, unpack


def _steps(q, shape):
    """Per-element step size (the stored scale broadcast to the tensor's shape)."""
    if q.axis == -1:
        return q.scale.float().repeat_interleave(q.group_size, -1).reshape(shape)
    return q.scale.float().repeat_interleave(q.group_size, -2).reshape(shape)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_identity(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), axis=st.sampled_from([-1, -2]), group=st.sampled_from([8, 16, 32]),
       scale=st.floats(1e-3, 1e3), offset=st.floats(-100, 100), seed=st.integers(0, 2 ** 16))
def test_round_trip_within_half_step(bits, axis, group, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 64, generator=g) * scale + offset
    q = quantize(x, bits, group, axis)
    y = dequantize(q)
    step = _steps(q, x.shape)
    assert torch.isfinite(y).all()
    # half a step of the stored fp16 scale, plus fp32 rounding of zero + code * scale (relative to the range)
    assert ((x - y).abs() <= step / 2 + 1e-6 * x.abs().max()).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [-1, -2])
def test_values_on_the_grid_come_back_exactly(bits, axis):
    g = torch.Generator().manual_seed(bits)
    levels = 2 ** bits - 1
    codes = torch.randint(0, levels + 1, (2, 2, 32, 32), generator=g).float()
    codes[..., 0, :] = 0        # make every group span the full code range
    codes[..., 1, :] = levels
    if axis == -1:
        codes[..., :, 0], codes[..., :, 1] = 0, levels
    zero, scale = -0.75, 0.125  # exactly representable in fp16
    x = zero + codes * scale
    y = dequantize(quantize(x, bits, 32, axis))
    assert torch.equal(x, y)


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_give_no_nan(bits):
    for value in (0.0, 0.3, -7.1, 1e4):
        x = torch.full((1, 2, 32, 32), value)
        y = dequantize(quantize(x, bits, 32, -1))
        assert torch.isfinite(y).all()
        assert (y - x).abs().max() <= abs(value) * 1e-3 + 1e-6


def test_storage_is_really_packed():
    x = torch.randn(1, 2, 64, 64)
    for bits in BITS:
        q = quantize(x, bits, 32, -1)
        assert q.codes.dtype == torch.uint8 and q.codes.numel() == x.numel() * bits // 8
        assert q.scale.dtype == torch.float16 and q.scale.shape == (1, 2, 64, 2)
    q = quantize(x, 2, 32, -2)
    assert q.scale.shape == (1, 2, 2, 64)  # per channel, one per block of 32 tokens


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5, group_size=32), "bits must be one of"),
    (dict(bits=4, group_size=24), "group_size must be a positive divisor"),
    (dict(bits=4, group_size=32, axis=0), "axis must be"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(1, 1, 32, 64), **kwargs)


def test_take_rows_equals_a_plain_gather_for_every_row_width():
    """Rows of packed codes (any byte count) and of fp16 scales, from views that start past row 0."""
    g = torch.Generator().manual_seed(2)
    for F, dtype in [(24, torch.uint8), (12, torch.uint8), (7, torch.uint8), (2, torch.float16), (3, torch.float16)]:
        t = torch.randint(0, 255, (2, 3, 40, F), generator=g).to(dtype)[..., 5:37, :]
        idx = torch.randint(0, 32, (2, 3, 9), generator=g)
        assert torch.equal(take_rows(t, idx), t.gather(2, idx[..., None].expand(-1, -1, -1, F)))
        flat = t.reshape(6, 32, F)
        assert torch.equal(take_rows(flat, idx.reshape(6, 9)), flat.gather(1, idx.reshape(6, 9, 1).expand(-1, -1, F)))
