"""Decode-attention speed on one GPU: the fused quantized-KV kernels vs fp16 SDPA, Llama-3-8B attention shapes
(32 query heads, 8 KV heads, head_dim 128), plus quantize-on-append and prefill quantization throughput.

    python benchmarks/bench_attention.py                       # markdown tables on stdout
    python benchmarks/bench_attention.py --sweep               # tune launch configs at batch 8, 32K first
    python benchmarks/bench_attention.py --profile int4        # a few eager calls, for `ncu`

Bandwidth columns count the bytes the cache stores (codes, scales, zeros, full-precision windows) over the
kernel time, next to the measured device-to-device copy bandwidth (bytes read + written).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speed_util import (apply_tuning, build_segments, copy_bandwidth, segments_bytes, sets_for,  # noqa: E402
                              time_calls)

from smartkv.core.quant import dequantize, quantize  # noqa: E402
from smartkv.kernels import (decode_attention, decode_attention_reference, quantize_pack,  # noqa: E402
                                   quantize_pack_kv)
from smartkv.kernels import cuda_attn  # noqa: E402
from smartkv.kernels import split as dec  # noqa: E402
from smartkv.kernels import triton_attn as K  # noqa: E402
from smartkv.kernels import tuning  # noqa: E402

HQ, HKV, D = 32, 8, 128
SCALING = D ** -0.5
FUSED = ["int8", "int4", "kivi2", "kivi24", "smartkv4", "smartkv4-cache", "smartkv-classes", "smartkv-classes-g32",
         "smartkv-classes-w248"]
POOL_CONFIGS = [dict(vars(tuning.current().pool))]  # --pool-configs
POOL_FIELDS = ("scores_block", "values_block", "num_warps", "split_tokens", "pack_heads", "values_warps")  # its order
_T0 = time.time()


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.time() - _T0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _query(B: int, gen) -> torch.Tensor:
    return torch.randn(B, HQ, 1, D, dtype=torch.float16, device="cuda", generator=gen)


def _sets(method: str, B: int, T: int, seed: int):
    """Rotating input sets: [(q, segments)], bytes stored per set."""
    gen = _gen(seed)
    first = build_segments(method, B, HKV, T, D, gen)
    nbytes = segments_bytes(first)
    sets = [(_query(B, gen), first)]
    for _ in range(sets_for(nbytes) - 1):
        sets.append((_query(B, gen), build_segments(method, B, HKV, T, D, gen)))
    return sets, nbytes


def _sdpa_call(q, seg, flash: bool):
    def call():
        if flash:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, seg.keys, seg.values, scale=SCALING, enable_gqa=True)
        return F.scaled_dot_product_attention(q, seg.keys, seg.values, scale=SCALING, enable_gqa=True)
    return call


def _dequant_call(q, seg):
    """What users have today: dequantize the whole cache, then SDPA."""
    def call():
        k = dequantize(seg.keys, torch.float16)
        v = dequantize(seg.values, torch.float16)
        return F.scaled_dot_product_attention(q, k, v, scale=SCALING, enable_gqa=True)
    return call


def _fused_call(q, segs):
    return lambda: decode_attention(q, segs, SCALING)


def _smartkv_cache(B: int, T: int, seed: int, budget: float = 4.0):
    """A SmartKV cache layer (defaults but `budget`; keys and values at different widths) filled with T random
    tokens and re-allocated once, as the cache holds them while decoding; its bytes (everything held)."""
    from smartkv.methods import make_cache

    gen = _gen(seed)
    cache = make_cache("smartkv", num_layers=1, budget=budget)
    layer = cache.layers[0]
    # in chunks, stored without the flush SmartKV's append runs after each: the one re-allocation below fits the key
    # normalisation on all of them
    from smartkv.cache.layer import KVLayer
    for t0 in range(0, T, 8192):
        n = min(8192, T - t0)
        KVLayer.append(layer, torch.randn(B, HKV, n, D, dtype=torch.float16, device="cuda", generator=gen),
                       torch.randn(B, HKV, n, D, dtype=torch.float16, device="cuda", generator=gen))
    layer._flush()
    return layer, cache.memory_report().total_bytes


def _smartkv_cache_calls(B: int, T: int, seed: int):
    """The SmartKV cache's own decode step, eager (what `attend` runs): the two-pass attention over the width
    pools, and the same plus folding the probabilities into the importance statistics."""
    layer, nbytes = _smartkv_cache(B, T, seed)
    q = _query(B, _gen(seed + 1))

    def attend():
        return layer._fused_decode(q, SCALING)

    def attend_observe():
        return layer._fused_decode(q, SCALING, observe=True)
    return layer, q, attend, attend_observe, nbytes


KERNEL_SPLIT = False  # --kernel-split
TRITON_ROWS = False  # --triton-rows


def kernel_split(fn, calls: int = 20, top: int = 8) -> str:
    """Device time per call of each kernel `fn` launches (torch.profiler over `calls` eager calls, after one
    warm-up), the largest first: where a multi-kernel step spends its GPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spent = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            spent[e.name] += e.device_time / calls
    parts = [f"{name[:48]} {us:.1f} us" for name, us in spent.most_common(top)]
    return f"{sum(spent.values()):.1f} us in kernels: " + "; ".join(parts)


def _row(T, B, name, t, base, nbytes, copy_bw):
    bw = nbytes / t if nbytes else float("nan")
    return dict(context=T, batch=B, method=name, time_us=t * 1e6, speedup=base / t if base else float("nan"),
                stored_mb=nbytes / 1e6, gbps=bw / 1e9, pct_copy=100 * bw / copy_bw)


def bench_config(T: int, B: int, methods: list[str], copy_bw: float, budget: Budget, rows: list, notes: list):
    free = torch.cuda.mem_get_info()[0]
    fp16_bytes = 2 * B * HKV * T * D * 2
    base = None
    if fp16_bytes * 2.2 < free and budget.left() > 0:
        sets, nbytes = _sets("fp16", B, T, seed=T + B)
        for name, flash in (("fp16 SDPA", False), ("fp16 SDPA (flash)", True)):
            try:
                t = time_calls([_sdpa_call(q, s[0], flash) for q, s in sets])
                base = base or t
                rows.append(_row(T, B, name, t, base, nbytes, copy_bw))
            except RuntimeError as e:
                notes.append(f"{name} at {T}x{B}: {str(e).splitlines()[0][:120]}")
        t = time_calls([_fused_call(q, s) for q, s in sets])
        rows.append(_row(T, B, "fp16 fused kernel", t, base, nbytes, copy_bw))
        del sets
        torch.cuda.empty_cache()
    else:
        notes.append(f"fp16 at {T}x{B}: skipped ({fp16_bytes / 1e9:.1f} GB per set)")
    for m in methods:
        if budget.left() < 20:
            notes.append(f"{m} at {T}x{B}: skipped (time budget)")
            continue
        if m == "smartkv4-cache":
            layer, q, attend, attend_observe, nbytes = _smartkv_cache_calls(B, T, seed=T * 7 + B)
            k_ref, v_ref = layer.stored_kv()
            ref = F.scaled_dot_product_attention(q, k_ref.half(), v_ref.half(), scale=SCALING, enable_gqa=True)
            del k_ref, v_ref
            notes.append(f"smartkv4-cache at {T}x{B}: widths k {sorted(layer.pools['k'])} v {sorted(layer.pools['v'])}")
            for cfg in POOL_CONFIGS:  # each config checked against dequantize + SDPA, then timed
                tuning.use(tuning.with_changes(tuning.current(), pool=cfg))
                tag = "" if len(POOL_CONFIGS) == 1 else " " + "/".join(str(cfg[f]) for f in POOL_FIELDS)
                try:  # a config that does not compile (resources) is a note, not the end of the run
                    err = ((attend()[0].transpose(1, 2).float() - ref.float()).norm() / ref.float().norm()).item()
                    notes.append(f"smartkv4-cache{tag} vs dequantize + SDPA at {T}x{B}: rel err {err:.1e}")
                    rows.append(_row(T, B, f"smartkv4 cache two-pass (eager){tag}",
                                     time_calls([attend], graph=False), base, nbytes, copy_bw))
                    rows.append(_row(T, B, f"smartkv4 cache two-pass + importance (eager){tag}",
                                     time_calls([attend_observe], graph=False), base, nbytes, copy_bw))
                    if KERNEL_SPLIT:
                        notes.append(f"smartkv4-cache{tag} + importance at {T}x{B}, device time per call: "
                                     + kernel_split(attend_observe))
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"smartkv4-cache{tag} at {T}x{B}: {type(exc).__name__}: {str(exc)[:150]}")
            tuning.use(tuning.with_changes(tuning.current(), pool=POOL_CONFIGS[0]))
            del layer, ref
            torch.cuda.empty_cache()
            continue
        sets, nbytes = _sets(m, B, T, seed=T * 7 + B)
        t = time_calls([_fused_call(q, s) for q, s in sets])
        rows.append(_row(T, B, m, t, base, nbytes, copy_bw))
        if m.startswith("smartkv-classes"):  # with each token's probability, as SmartKV's importance needs
            rows.append(_row(T, B, f"{m} + probs", time_calls(
                [lambda q=q, s=s: decode_attention(q, s, SCALING, return_token_probs=True) for q, s in sets]),
                base, nbytes, copy_bw))
        if TRITON_ROWS:  # the same method on the portable Triton kernels, in the same run
            os.environ["SMARTKV_FAST_ATTN"] = "0"
            try:
                rows.append(_row(T, B, f"{m} (Triton)", time_calls([_fused_call(q, s) for q, s in sets]), base,
                                 nbytes, copy_bw))
            finally:
                os.environ.pop("SMARTKV_FAST_ATTN", None)
        if m == "int4" and B * T * HKV * D * 4 * 6 < free:  # dequantize-then-SDPA needs fp32 temporaries
            q, segs = sets[0]
            ref = _dequant_call(q, segs[0])()
            err = ((decode_attention(q, segs, SCALING).float() - ref.float()).norm() / ref.float().norm()).item()
            t = time_calls([_dequant_call(q, s[0]) for q, s in sets[:2]])
            rows.append(_row(T, B, "int4 dequantize + SDPA", t, base, nbytes, copy_bw))
            notes.append(f"int4 fused vs dequantize+SDPA at {T}x{B}: rel err {err:.1e}")
        del sets
        torch.cuda.empty_cache()


def probe_code_mode(notes: list):
    """Code modes 0, 2 and 3 (the default) read codes as fp16 subnormals on the tensor cores; if this card flushes
    them, use mode 1."""
    gen = _gen(2)
    worst = 0.0
    for m in ("int4", "kivi2"):
        segs = build_segments(m, 2, HKV, 1000, D, gen)
        q = _query(2, gen)
        ref = decode_attention_reference(q, segs, SCALING)
        out = decode_attention(q, segs, SCALING)
        worst = max(worst, ((out.float() - ref.float()).norm() / ref.float().norm()).item())
    if worst > 1e-2:
        table = tuning.current()
        tuning.use(tuning.with_changes(table, split={k: {"code_mode": 1} for k in table.split}))
        notes.append(f"fp16-subnormal codes rel err {worst:.1e}: subnormals flushed here, using code mode 1")
    else:
        notes.append(f"fp16-subnormal codes (code modes 0/2/3) verified: rel err {worst:.1e}")


def spot_check(methods: list[str], notes: list):
    """Fused output vs the fp32 torch reference on a small cache, per method."""
    for m in ["fp16"] + [m for m in methods if m != "smartkv4-cache"]:  # the cache row checks itself
        gen = _gen(1)
        segs = build_segments(m, 2, HKV, 4096 + 77, D, gen)
        q = _query(2, gen)
        lengths = torch.tensor([4096 + 77, 1000], device="cuda")
        out, probs = decode_attention(q, segs, SCALING, lengths, return_token_probs=True)
        ref, rprobs = decode_attention_reference(q, segs, SCALING, lengths, return_token_probs=True)
        e = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        ep = max(((a - b).norm() / b.norm()).item() for a, b in zip(probs, rprobs, strict=True))
        fast = decode_attention(q, segs, SCALING, lengths)  # no probabilities: the CUDA path where it applies
        ef = ((fast.float() - ref.float()).norm() / ref.float().norm()).item()
        why = cuda_attn.unsupported(q, segs) or "CUDA fast path"
        notes.append(f"spot check {m}: output rel err {e:.1e}, token probs rel err {ep:.1e}, "
                     f"without probs {ef:.1e} ({why})")


VARIANTS = {  # (kind, key bits) -> Tuning fields to try (each on top of the current default)
    # Per-token kinds run one-warp programs of 32 tokens (H200, 2026-11-29: 12-25% faster than 4 warps x 128):
    # the same registers per thread, but an SM's 8 warps are 8 independent programs, no barriers across warps.
    # The register caps trade spills for more programs per SM (224: 9, 200: 10, 168: 12).
    (K.TOK, 4): [dict(), dict(block_n=128, num_warps=4, prefetch=2), dict(prefetch=0), dict(maxnreg=224),
                 dict(maxnreg=200), dict(maxnreg=168), dict(block_n=64, prefetch=0),
                 dict(block_n=64, num_warps=2, prefetch=2),
                 # merges of fewer programs than SMs (--sweep-batch 1: 128 splits per KV head at 32K): 128 / 4 is
                 # the default (H200: 37.4 us against 42.6 at 16 / 1, 39.2 at 64 / 4); at batch 8+ the others
                 dict(few_merge_block_s=16, few_merge_warps=1), dict(few_merge_block_s=64, few_merge_warps=4),
                 dict(merge_block_s=64, merge_warps=4)],
    (K.TOK, 8): [dict(), dict(block_n=128, num_warps=4, prefetch=2), dict(prefetch=1), dict(maxnreg=224),
                 dict(maxnreg=200), dict(maxnreg=168), dict(block_n=32, num_warps=2, prefetch=1)],
    # per-channel keys: a block holds 16 / (query heads per KV head) key groups (block_n 0) or fewer (1 warp)
    # code mode 3 for per-channel keys too (the scaled query divided per channel; sm_90 SASS: 1474 -> 1021
    # instructions per 128-token block, 8 bytes of stack): not yet timed
    (K.CHAN, 2): [dict(), dict(code_mode=3), dict(code_mode=3, prefetch=1), dict(prefetch=1),
                  dict(block_n=32, num_warps=1, prefetch=0, min_split_tokens=64),
                  dict(block_n=32, num_warps=1, prefetch=2, min_split_tokens=64),
                  dict(block_n=64, num_warps=2, prefetch=0, min_split_tokens=64)],
}
SWEEP_METHOD = {(K.TOK, 4): "int4", (K.TOK, 8): "int8", (K.CHAN, 2): "kivi2"}


def sweep(budget: Budget, lines: list, T: int = 32768, B: int = 8, methods: list[str] | None = None):
    """Try launch configs at (B, T) for the kernels of `methods` (all swept ones if None); keep the fastest in
    the active tuning table."""
    for key, variants in VARIANTS.items():
        m = SWEEP_METHOD[key]
        if methods is not None and m not in methods:
            continue
        sets, nbytes = _sets(m, B, T, seed=5)
        q0, s0 = sets[0]
        ref = decode_attention_reference(q0, s0, SCALING).float()  # every variant is checked against it
        best = None
        default = tuning.split_tuning(*key)
        for kw in variants:
            if budget.left() < 60:
                lines.append(f"| {m} | {kw} | skipped (time budget) |")
                break
            base = dict(vars(default))
            base.update(kw)
            tuning.use(tuning.with_changes(tuning.current(), split={key: tuning.Tuning(**base)}))
            try:
                err = ((decode_attention(q0, s0, SCALING).float() - ref).norm() / ref.norm()).item()
                t = time_calls([_fused_call(q, s) for q, s in sets], min_time_s=0.1)
            except Exception as e:  # a variant that does not compile or fit: note it, keep going
                lines.append(f"| {m} | {kw} | failed: {str(e).splitlines()[0][:80]} |")
                continue
            kern = dec.LAST_KERNELS.get((key[0], key[1], key[1]))
            regs = f"{kern.n_regs} regs, {kern.n_spills} spills" if kern is not None and hasattr(kern, "n_regs") else ""
            lines.append(f"| {m} | {kw} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | {regs}; rel err {err:.1e} |")
            if err > 2e-3:  # a wrong kernel is not a candidate, however fast
                continue
            if best is None or t < best[0]:
                best = (t, tuning.Tuning(**base))
        tuning.use(tuning.with_changes(tuning.current(), split={key: best[1]}))
        lines.append(f"| **{m} best** | {vars(best[1])} | {best[0] * 1e6:.1f} | {nbytes / best[0] / 1e9:.0f} | |")
        del sets, ref, q0, s0
        torch.cuda.empty_cache()


def bench_quantize(copy_bw: float, budget: Budget) -> list[str]:
    gen = _gen(3)
    out = ["| operation | shape (B, H, T, D) | time (us) | GB/s (read + written) | % of copy | torch path (us) |",
           "|---|---|---|---|---|---|"]
    for B in (1, 8, 32):  # append: one new token of one layer, keys and values, into a preallocated cache
        if budget.left() < 0:
            break
        k = torch.randn(B, HKV, 1, D, dtype=torch.float16, device="cuda", generator=gen)
        v = torch.randn_like(k)
        cache = tuple(quantize(torch.zeros(B, HKV, 64, D, device="cuda"), 4, 32) for _ in range(2))
        t = time_calls([lambda k=k, v=v, c=cache: quantize_pack_kv(k, v, 4, 32, out=c, start=7)])
        t_ref = time_calls([lambda k=k, v=v: (quantize(k, 4, 32), quantize(v, 4, 32))])
        fk = torch.zeros(B, HKV, 64, D, dtype=torch.float16, device="cuda")
        fv = torch.zeros_like(fk)

        def store(k=k, v=v, fk=fk, fv=fv):
            fk[:, :, 7:8] = k
            fv[:, :, 7:8] = v
        t_fp = time_calls([store])
        moved = 2 * k.nbytes + 2 * cache[0].nbytes // 64
        out.append(f"| int4 append (K+V, one launch) | ({B}, {HKV}, 1, {D}) | {t * 1e6:.1f} | "
                   f"{moved / t / 1e9:.1f} | {100 * moved / t / copy_bw:.1f} | {t_ref * 1e6:.1f} "
                   f"(fp16 store: {t_fp * 1e6:.1f}) |")
    prefill = ((4, -1, "int4 per-token"), (8, -1, "int8 per-token"), (2, -2, "2-bit per-channel (KIVI keys)"))
    for bits, axis, label in prefill:
        if budget.left() < 0:
            break
        x = torch.randn(8, HKV, 32768, D, dtype=torch.float16, device="cuda", generator=gen)
        q = quantize_pack(x, bits, 32, axis)
        t = time_calls([lambda x=x, b=bits, a=axis, q=q: quantize_pack(x, b, 32, a, out=q)])
        t_ref = (time_calls([lambda x=x, b=bits, a=axis: quantize(x, b, 32, a)], graph=False) if bits != 8
                 else float("nan"))
        moved = x.nbytes + q.nbytes
        out.append(f"| prefill {label} | (8, {HKV}, 32768, {D}) | {t * 1e6:.0f} | {moved / t / 1e9:.0f} | "
                   f"{100 * moved / t / copy_bw:.0f} | {t_ref * 1e6:.0f} |")
        del x, q
        torch.cuda.empty_cache()
    return out


def decode_table(rows: list) -> list[str]:
    out = ["| context | batch | method | time (us) | vs fp16 SDPA | stored (MB) | GB/s | % of copy BW |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['context'] // 1024}K | {r['batch']} | {r['method']} | {r['time_us']:.1f} | "
                   f"{r['speedup']:.2f}x | {r['stored_mb']:.0f} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,32768,131072", help="comma-separated context lengths")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--methods", default=",".join(FUSED), help=f"fused methods, from {FUSED}")
    ap.add_argument("--sweep", action="store_true", help="tune launch configs at batch 8, 32K first")
    ap.add_argument("--tuning", default=None, metavar="JSON",
                    help="start from the launch configs of an earlier bench_attention.json (its \"tuning\")")
    ap.add_argument("--sweep-batch", type=int, default=8, help="batch the sweep tunes at (32K context)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    ap.add_argument("--out", default=None, help="folder for bench_attention.md / .json")
    ap.add_argument("--profile", default=None, help="run 20 eager calls of one method at batch 8, 32K (for ncu)")
    ap.add_argument("--pool-configs", default=None, metavar="S/V/W[/P[/H[/VW]]],...",
                    help="SmartKV cache rows for each launch config of the pool passes: scores block / values "
                         "block / scores warps [/ fewest tokens per values split [/ pack heads 0 or 1 [/ values warps]]], e.g. "
                         "32/32/4,64/32/4/512/0 (default: the library's)")
    ap.add_argument("--kernel-split", action="store_true",
                    help="also note the device time of each kernel of the SmartKV cache step (torch.profiler)")
    ap.add_argument("--triton-rows", action="store_true",
                    help="also time each fused method on the Triton kernels (SMARTKV_FAST_ATTN=0), same run")
    args = ap.parse_args()
    global KERNEL_SPLIT, TRITON_ROWS
    KERNEL_SPLIT, TRITON_ROWS = args.kernel_split, args.triton_rows
    if args.pool_configs:
        given = [dict(zip(POOL_FIELDS, map(int, c.split("/")))) for c in args.pool_configs.split(",")]
        if any(len(c) < 3 for c in given):
            ap.error(f"--pool-configs: each config is S/V/W, S/V/W/P, S/V/W/P/H or S/V/W/P/H/VW (integers), got "
                     f"{args.pool_configs!r}")
        POOL_CONFIGS[:] = [dict(vars(tuning.current().pool), **c) for c in given]  # fields left out: the library's
    budget = Budget(args.budget_s)
    methods = [m for m in args.methods.split(",") if m]
    if args.profile:
        sets, _ = _sets(args.profile, 8, 32768, seed=0)
        for _ in range(20):
            _fused_call(*sets[0])()
        torch.cuda.synchronize()
        return
    props = torch.cuda.get_device_properties(0)
    head = [f"card: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {__import__('triton').__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"command: python {' '.join(sys.argv)}"]
    copy_bw = copy_bandwidth()
    head.append(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + written)")
    print("\n".join(head), flush=True)
    notes, sweep_lines = [], []
    if args.tuning:
        notes.append(f"launch configs from {args.tuning}: {json.dumps(apply_tuning(args.tuning))}")
    probe_code_mode(notes)
    print(notes[-1], flush=True)
    if args.sweep:
        sweep_lines = ["| method | variant | time (us) | GB/s | compiled |", "|---|---|---|---|---|"]
        sweep(budget, sweep_lines, B=args.sweep_batch, methods=methods)
        print("\n".join(sweep_lines), flush=True)
    spot_check(methods, notes)
    rows = []
    configs = [(T, B) for T in map(int, args.contexts.split(",")) for B in map(int, args.batches.split(","))]
    configs.sort(key=lambda c: c != (32768, 8))  # the target configuration first, in case time runs out
    for T, B in configs:
        if budget.left() < 20:
            notes.append(f"{T}x{B}: skipped (time budget)")
            continue
        n = len(rows)
        bench_config(T, B, methods, copy_bw, budget, rows, notes)
        print("\n".join(decode_table(rows[n:])[2:]), flush=True)
    rows.sort(key=lambda r: (r["context"], r["batch"]))
    qlines = bench_quantize(copy_bw, budget)
    tuning_used = {str(k): vars(v) for k, v in tuning.current().split.items()}
    report = head + ["", "### Decode attention (one layer, one new token per sequence)", ""] + decode_table(rows)
    report += ["", "### Quantize and pack", ""] + qlines + ["", "notes:"] + [f"- {n}" for n in notes]
    report += ["", f"launch configs: {json.dumps(tuning_used)}"]
    if sweep_lines:
        report += ["", f"### Launch-config sweep (batch {args.sweep_batch}, 32K)", ""] + sweep_lines
    print("\n" + "\n".join(report))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_attention.md"), "w") as f:
            f.write("\n".join(report) + "\n")
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump(dict(head=head, rows=rows, notes=notes, tuning=tuning_used), f, indent=1)


if __name__ == "__main__":
    main()
