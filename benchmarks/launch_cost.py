"""Host microseconds a call, nothing synchronised inside the timed loop (CUDA only): a torch op, and
`decode_attention` at the runner's shape (8K tokens x 1 sequence, head_dim 64, 3 KV heads, 9 query heads; the Triton
path) over int4's one segment and over SmartKV's class segments (sinks and classes marked stable, as an append
layer's step passes them; the window), without and with the window's probabilities folded into codes. What an eager
decode step of a batch of one pays a launch. Then the class segments at larger shapes, the batched launch
(`kernels.batched`, up to its MAX_ROWS rows) against a launch a segment: where the card, not the host, sets the
pace, wall exceeds host time.

    PYTHONPATH=.:benchmarks python benchmarks/launch_cost.py            # SMARTKV_BATCH_SEGMENTS=0: a launch a segment
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed_util import build_segments, stable  # noqa: E402
from smartkv.kernels import FoldInto, decode_attention  # noqa: E402

g = torch.Generator(device="cuda").manual_seed(0)


def host_us(f, n=300):
    """(host us, wall us) a call of f over n calls after 20 warm-up calls."""
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    h = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return h, (time.perf_counter() - t) / n * 1e6


x = torch.zeros(16, device="cuda")
print("torch add_: host %.1f us, wall %.1f us" % host_us(lambda: x.add_(1)))
q = torch.randn(1, 9, 64, device="cuda", dtype=torch.float16)
for m in ("int4", "smartkv-classes"):
    segs = stable(build_segments(m, 1, 3, 8192, 64, g))
    print(m, len(segs), "segments:", "host %.1f us, wall %.1f us" % host_us(lambda: decode_attention(q, segs, 0.125)))
    if m != "int4":
        T = segs[-1].num_tokens
        codes = torch.full((1, 3, T), 255, dtype=torch.uint8, device="cuda")
        seen = torch.zeros(1, T, dtype=torch.uint8, device="cuda")
        po = [None] * (len(segs) - 1) + [FoldInto(codes, seen, 3)]
        print(m, "+ window fold:", "host %.1f us, wall %.1f us" % host_us(
            lambda: decode_attention(q, segs, 0.125, return_token_probs=True, probs_out=po)))

for B, H, T in ((1, 8, 16384), (4, 8, 4096), (8, 8, 2048)):   # B x H x T = 2^17 rows: batched.MAX_ROWS
    segs = stable(build_segments("smartkv-classes", B, H, T, 64, g))
    qb = torch.randn(B, 4 * H, 64, device="cuda", dtype=torch.float16)
    for v in "01":
        os.environ["SMARTKV_BATCH_SEGMENTS"] = v
        print(f"smartkv-classes {B} x {H} x {T}, batched {v}:", "host %.1f us, wall %.1f us" % host_us(
            lambda: decode_attention(qb, segs, 0.125), 100))
    os.environ.pop("SMARTKV_BATCH_SEGMENTS")
