"""Which pool shapes SmartKV's two Triton passes compute right on this machine's GPU, including the ones
`triton_pool.pool_ok` sends to the torch path: scores and values of one pool (plus a full-precision run) against
the torch reference, per (bits, head_dim, group size), at the library's launch config.

    python benchmarks/check_pool_groups.py        # on a CUDA machine (or TRITON_INTERPRET=1 on CPU)
"""
from __future__ import annotations

import torch

from smartkv.core.quant import quantize
from smartkv.kernels import reference as R
from smartkv.kernels import triton_pool as tp
from smartkv.kernels import tuning


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(bits: int, D: int, G: int, dev: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(bits * 1000 + D + G)
    B, Hkv, NG, N, n_sink = 2, 2, 4, 300, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    pos = torch.arange(N, dtype=torch.int32).expand(B, Hkv, N).contiguous().to(dev)
    keys = quantize(rnd(B, Hkv, N, D).to(dev) * 2, bits, G, axis=-1)
    vals = quantize(rnd(B, Hkv, N, D).to(dev), bits, G, axis=-1)
    fp = [(rnd(B, Hkv, n_sink, D).half().to(dev), 0)]
    q = rnd(B, Hkv * NG, D).to(dev)
    logits = torch.empty(B, Hkv * NG, n_sink + N, device=dev)
    ref = logits.clone()
    tp.pool_scores_triton(q, [(keys, pos, n_sink)], logits, D ** -0.5, None, q, fp)
    R.pool_scores_reference(q, [(keys, pos, n_sink)], ref, D ** -0.5, None, q, fp)
    probs = torch.softmax(ref * 3, -1)
    mid, _ = tp.pool_values_triton(probs, [(vals, pos, n_sink)], fp, None)
    ref_mid, _ = R.pool_values_reference(probs, [(vals, pos, n_sink)], fp)
    return rel(logits, ref), rel(mid, ref_mid)


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"launch config {tuning.current().pool}; relative error vs the torch reference (bound 3e-3)")
    print("| bits | head_dim | group | groups/token | pool_ok | scores | values |")
    print("|---|---|---|---|---|---|---|")
    for bits in (2, 3, 4, 8):
        for D, G in ((64, 64), (64, 32), (64, 16), (128, 64), (128, 32), (128, 16)):
            ok = tp.pool_ok(quantize(torch.zeros(1, 1, 1, D, device=dev), bits, G, axis=-1))
            try:
                s, v = check(bits, D, G, dev)
                cells = [f"{x:.1e}" + ("" if x < 3e-3 else " WRONG") for x in (s, v)]
            except Exception as exc:  # noqa: BLE001  a shape that does not compile is a result too
                cells = [f"{type(exc).__name__}", ""]
            print(f"| {bits} | {D} | {G} | {D // G} | {ok} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
