"""Where decode attention's time goes: a ladder of partial kernels over the same packed cache, in one run.

    PYTHONPATH=. python benchmarks/bench_ladder.py [--contexts 32768 --batch 8 --methods int4,kivi2] [--out DIR]
    ... --variants "4,3,1;4,2,4"     # launch shapes of the CUDA kernel to compare (warps, stages, min_blocks)

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), one new token per sequence. For each
method the rungs are (a) stream the stored bytes into the SMs (the CUDA kernel's cp.async ring, nothing
computed), (b) + unpack every code to an fp16 operand, (c) + the q.k dot with scales and zeros, (d) the whole
attention (the CUDA fast path), and the Triton split kernel (the portable fallback) for comparison; next to
them fp16 SDPA at the same size. Each as time, GB/s of
the stored bytes (codes, scales, zeros, full-precision windows), % of the device-to-device copy bandwidth
(bytes read + written) and speed-up over fp16 SDPA. Timing as bench_attention.py (CUDA-graph replays cycling
through input sets several times the L2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speed_util import build_segments, copy_bandwidth, segments_bytes, sets_for, time_calls  # noqa: E402

from smartkv.kernels import cuda_attn, decode_attention, decode_attention_reference, tuning  # noqa: E402

HQ, HKV, D = 32, 8, 128
SCALING = D ** -0.5
RUNGS = [(0, "(a) stream the stored bytes"), (1, "(b) + unpack to fp16"), (2, "(c) + q.k, scales, zeros"),
         (3, "(d) full attention (CUDA fast path)")]


def _sets(method: str, B: int, T: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    first = build_segments(method, B, HKV, T, D, gen)
    nbytes = segments_bytes(first)
    sets = [first] + [build_segments(method, B, HKV, T, D, gen) for _ in range(sets_for(nbytes) - 1)]
    qs = [torch.randn(B, HQ, 1, D, dtype=torch.float16, device="cuda", generator=gen) for _ in sets]
    return list(zip(qs, sets)), nbytes


def _triton_call(q, segs):
    def call():
        os.environ["SMARTKV_FAST_ATTN"] = "0"
        try:
            return decode_attention(q, segs, SCALING)
        finally:
            os.environ.pop("SMARTKV_FAST_ATTN", None)
    return call


def _row(name, t, nbytes, copy_bw, base):
    return dict(rung=name, time_us=t * 1e6, gbps=nbytes / t / 1e9, pct_copy=100 * nbytes / t / copy_bw,
                vs_sdpa=base / t if base else float("nan"))


def ladder(method: str, B: int, T: int, copy_bw: float, base: float, notes: list, variants: list) -> list[dict]:
    sets, nbytes = _sets(method, B, T, seed=T + 7 * B)
    q0, s0 = sets[0]
    ref = decode_attention_reference(q0, s0, SCALING)
    rows, tag = [], f"{method} {T // 1024}K"
    for var in variants:
        vtag = tag + (" [" + ",".join(f"{k}={v}" for k, v in var.items()) + "]" if var else "")
        with tuning.override(cuda=var):
            out = cuda_attn.decode_attention_cuda(q0, s0, SCALING)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            kern = cuda_attn.kernels(q0.device.index or 0, D, *cuda_attn._kinds(s0[0]))
            notes.append(f"{vtag} x {B}: stored {nbytes / 1e6:.0f} MB; fast path vs fp32 reference rel err "
                         f"{err:.1e}; kernel {kern.regs} registers, {kern.smem} B shared, {kern.blocks_per_sm} "
                         f"blocks of {kern.nw} warps per SM")
            for ladder_rung, name in RUNGS:
                calls = [lambda q=q, s=s, r=ladder_rung: cuda_attn.decode_attention_cuda(q, s, SCALING, ladder=r)
                         for q, s in sets]
                rows.append(_row(f"{vtag}: {name}", time_calls(calls), nbytes, copy_bw, base))
    rows.append(_row(f"{tag}: Triton split kernel (the fallback)", time_calls([_triton_call(q, s) for q, s in sets]),
                     nbytes, copy_bw, base))
    return rows


def sdpa_time(B: int, T: int) -> float:
    sets, _ = _sets("fp16", B, T, seed=1)
    return time_calls([lambda q=q, s=s[0]: F.scaled_dot_product_attention(q, s.keys, s.values, scale=SCALING,
                                                                          enable_gqa=True) for q, s in sets])


def table(rows: list[dict]) -> list[str]:
    out = ["| rung | time (us) | GB/s (stored bytes) | % of copy BW | vs fp16 SDPA |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['rung']} | {r['time_us']:.1f} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | "
                   f"{r['vs_sdpa']:.2f}x |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="32768", help="comma-separated context lengths")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="int4,kivi2", help="from int4, int8, kivi2, kivi24")
    ap.add_argument("--variants", default="", help="launch shapes: warps,stages,min_blocks;... (default: tuning's)")
    ap.add_argument("--out", default=None, help="folder for bench_ladder.md / .json")
    args = ap.parse_args()
    variants = [dict(zip(("warps", "stages", "min_blocks"), map(int, v.split(",")))) for v in args.variants.split(";")
                if v]
    variants = variants or [{}]
    props = torch.cuda.get_device_properties(0)
    head = [f"card: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"command: python {' '.join(sys.argv)}"]
    copy_bw = copy_bandwidth()
    head.append(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + written)")
    print("\n".join(head), flush=True)
    rows, notes = [], []
    for T in map(int, args.contexts.split(",")):
        base = sdpa_time(args.batch, T)
        rows.append(_row(f"fp16 SDPA {T // 1024}K (baseline)", base, 2 * args.batch * HKV * T * D * 2, copy_bw, base))
        torch.cuda.empty_cache()
        for m in args.methods.split(","):
            n = len(rows)
            rows += ladder(m, args.batch, T, copy_bw, base, notes, variants)
            print("\n".join(table(rows)[2:][n:]), flush=True)
            torch.cuda.empty_cache()
    report = head + ["", f"### Ladder at batch {args.batch}", ""] + table(rows)
    report += ["", "notes:"] + [f"- {n}" for n in notes]
    print("\n" + "\n".join(report))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_ladder.md"), "w") as f:
            f.write("\n".join(report) + "\n")
        with open(os.path.join(args.out, "bench_ladder.json"), "w") as f:
            json.dump(dict(head=head, rows=rows, notes=notes), f, indent=1)


if __name__ == "__main__":
    main()
