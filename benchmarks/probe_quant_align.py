"""Prefill quantize-and-pack on a GPU: the kernel with its (batch, head) row offsets hinted 16-aligned (ALIGNED,
the default where the strides allow), without the hint, and fully specialised on every stride (what the kernel
was before its strides stopped being specialised, 8dd916b). Medians of CUDA-event timings."""
import torch
import triton

from smartkv.kernels import quantize_pack
from smartkv.kernels import triton_quant as tq


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
    return sorted(out)[len(out) // 2]


def main():
    spec = triton.jit(tq._quant_tok_kernel.fn)   # every integer argument specialised (divisibility by 16)
    for shape in ((8, 8, 32768, 128), (1, 8, 8192, 128), (8, 8, 1, 128)):
        x = torch.randn(shape, dtype=torch.float16, device="cuda")
        for bits in (4, 8, 3, 2):
            q = tq._empty_like_q(x, bits, 32, -1)
            B, H, T, D = x.shape
            BT = 32
            grid = (triton.cdiv(T, BT), B * H, 1)
            args = x.stride()[:3] + tq._meta_strides(q)

            def run(kern, aligned):
                return lambda: kern[grid](x, q.codes, q.scale, q.zero, x, q.codes, q.scale, q.zero, *args, *args,
                                          H, T, 0, x, BITS=bits, G=32, D=D, BLOCK_T=BT, START_PTR=False,
                                          ALIGNED=aligned, num_warps=4)
            t_hint = timed(run(tq._quant_tok_kernel, True))
            ref = quantize_pack(x, bits, 32)
            same = all(torch.equal(getattr(ref, f), getattr(q, f)) for f in ("codes", "scale", "zero"))
            t_plain = timed(run(tq._quant_tok_kernel, False))
            t_spec = timed(run(spec, False))
            gb = (x.numel() * 2 + q.codes.numel() + q.scale.numel() * 4) / 1e9
            print(f"{shape} {bits}-bit: hinted {t_hint:.1f} us ({gb / t_hint * 1e6:.0f} GB/s), unhinted "
                  f"{t_plain:.1f}, fully specialised {t_spec:.1f}; wrapper bytes equal hinted run: {same}", flush=True)


if __name__ == "__main__":
    main()
