"""End-to-end decoding speed: a Llama-3-8B-shaped model (random bf16 weights, no download) decoding through each cache.

Caches are filled synthetically to the context length (random K/V appended to every layer; a prefill of 8 x 32K
would cost more than the measurement), then real decode steps run through the whole model: one new token per
sequence, CUDA events around each step, synchronised after each (as a decode loop that reads its token does),
warm-up steps first, the median and the mean step reported. tokens/s = batch / mean step time: SmartKV
re-allocates every `realloc_every` (16) steps, so over a multiple of 16 steps its mean is the amortised cost
(its median step hides the re-allocations; for the other caches the two agree).

    PYTHONPATH=. python benchmarks/bench_e2e.py --out $OUT      # CUDA only

Rows: fp16 DynamicCache (SDPA's default backend, and flash forced), int8, int4, kivi (2/2 and 2/4), and the
dequantize-everything path (`use_kernels=False`) at --batch; then each method at the largest batch that fits at
the context (estimated from memory_report bytes per token + the weights, then run; stepped down on OOM).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import smartkv
from smartkv.cache.graphs import GraphDecoder
from smartkv.cache.hf_compat import cache_kwargs, use_attention

GIB = 2 ** 30
METHODS = {  # row name -> (method, params); "dynamic" rows use transformers' DynamicCache
    "fp16 DynamicCache (SDPA)": ("dynamic", {}),
    "fp16 DynamicCache (flash)": ("dynamic-flash", {}),
    "int8": ("int8", {}),
    "int4": ("int4", {}),
    "kivi-2 (K2/V2)": ("kivi", dict(key_bits=2, value_bits=2)),
    "kivi 2/4": ("kivi", dict(key_bits=2, value_bits=4)),
    "int4 dequantize + SDPA (use_kernels=False)": ("int4", dict(use_kernels=False)),
    "smartkv (budget 4.25; gap 3)": ("smartkv", dict(budget=4.25, key_value_gap=3)),
    # re-allocating every 64 tokens instead of 16: a quarter of the re-allocation steps, up to 48 more
    # full-precision tokens in the window (docs/smartkv.md has its quality)
    "smartkv (budget 4.25; gap 3; realloc 64)": ("smartkv", dict(budget=4.25, key_value_gap=3, realloc_every=64,
                                                                 realloc="incremental", joint=False)),
    # whole decode steps captured once as a CUDA graph and replayed (smartkv.cache.graphs.GraphDecoder): no host cost
    "fp16 (CUDA graph)": ("fp16", {}),
    "int8 (CUDA graph)": ("int8", {}),
    "int4 (CUDA graph)": ("int4", {}),
    "fp16 StaticCache (CUDA graph)": ("hf-static", {}),   # transformers' own static cache, SDPA with its mask
    # SmartKV's default (realloc="append", joint classes, class_norm="previous"): two graphs, the common step and
    # the flushing one
    "smartkv (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3)),
    # the default before append: one graph per re-allocation period, the re-allocation on the host between replays
    "smartkv incremental (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3,
                                                                              realloc="incremental", joint=False)),
    # realloc="append" (joint classes, a ring of recent tokens): two graphs, the common step and the flushing one
    "smartkv append (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3,
                                                                         realloc="append", class_norm="exact")),
    # the class rows' importance folded in the attention pass with the previous query's normaliser (no logits)
    "smartkv append (budget 4.25; gap 3; fold) (CUDA graph)": (
        "smartkv", dict(budget=4.25, key_value_gap=3, realloc="append", joint=True, class_norm="previous")),
    # while the ring fills, one flush in 4 (16) demotes, paying ahead: fewer passes over the class buffers
    "smartkv append (budget 4.25; gap 3; demote every 4) (CUDA graph)": (
        "smartkv", dict(budget=4.25, key_value_gap=3, realloc="append", class_norm="exact", demote_every=4)),
    "smartkv append (budget 4.25; gap 3; demote every 16) (CUDA graph)": (
        "smartkv", dict(budget=4.25, key_value_gap=3, realloc="append", class_norm="exact", demote_every=16)),
    "smartkv (budget 4.25; gap 3; realloc 64) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3,
                                                                              realloc_every=64, realloc="incremental",
                                                                              joint=False)),
    # the design before block widths and incremental re-allocation: a width per token, the whole middle
    # re-allocated every 16 tokens
    "smartkv per-token full (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3,
                                                                                 block_tokens=1, realloc="full",
                                                                                 joint=False)),
    "smartkv per-token full (budget 4.25; gap 3)": ("smartkv", dict(budget=4.25, key_value_gap=3, block_tokens=1,
                                                                    realloc="full", joint=False)),
    # a width per block of 16 tokens (quality held at this memory point, not at KIVI-2's: docs/smartkv.md)
    "smartkv block 16 (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3,
                                                                           block_tokens=16, joint=False)),
    # joint classes, class-major pools: the one-pass step (decode_attention over one segment a class, 3-bit
    # classes included, on the CUDA kernels); widths 2/4/8 cost quality (docs/smartkv.md)
    "smartkv joint (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3, joint=True,
                                                                        realloc="incremental")),
    "smartkv joint 2/4/8 (budget 4.25; gap 3) (CUDA graph)": ("smartkv", dict(budget=4.25, key_value_gap=3,
                                                                              realloc="incremental",
                                                                              widths=(2, 4, 8))),
}
GRAPH = " (CUDA graph)"
MAX_BATCH_ROWS = ["fp16 DynamicCache (SDPA)", "fp16 DynamicCache (flash)", "int8", "int4", "kivi-2 (K2/V2)",
                  "kivi 2/4"]


DEV = "cuda"


def llama3_8b_config(layers: int, smoke: bool = False) -> LlamaConfig:
    if smoke:  # the same code path on CPU in seconds (head_dim 32)
        return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=False)


def build_model(layers: int, smoke: bool = False) -> LlamaForCausalLM:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = LlamaForCausalLM(llama3_8b_config(layers, smoke)).eval()
    torch.set_default_dtype(torch.float32)
    return model


def fill(model, method: str, params: dict, batch: int, context: int, extra: int, chunk: int = 2048):
    """A cache of `context` random tokens per layer, with room for `extra` more."""
    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device=DEV).manual_seed(0)
    n = min(chunk, context)
    k = torch.randn(batch, H, n, D, device=DEV, dtype=torch.bfloat16, generator=g)  # (B, H, chunk, D)
    v = torch.randn(batch, H, n, D, device=DEV, dtype=torch.bfloat16, generator=g)

    def whole(x):  # the chunk repeated to `context` tokens: one tensor per layer, as a prefill leaves it
        return x.repeat(1, 1, math.ceil(context / n), 1)[..., :context, :]

    if method == "hf-static":
        use_attention(model, "sdpa")
        cache = StaticCache(config=cfg, max_cache_len=context + extra)
        for i in range(cfg.num_hidden_layers):
            for start in range(0, context, n):
                T = min(n, context - start)
                cache.update(k[..., :T, :], v[..., :T, :], i,
                             {"cache_position": torch.arange(start, start + T, device=DEV)})
        return cache
    if method.startswith("dynamic"):
        use_attention(model, "sdpa")
        cache = DynamicCache()
        for i in range(cfg.num_hidden_layers):
            cache.update(whole(k), whole(v), i)
        return cache
    cache = smartkv.make_cache(method, model, **params)
    cache.reserve(context + extra)
    if method == "fp16":  # concatenates on every append: filled in one
        for layer in cache.layers:
            layer.append(whole(k), whole(v))
        return cache
    for layer in cache.layers:
        for start in range(0, context, n):
            T = min(n, context - start)
            layer.append(k[..., :T, :], v[..., :T, :])
    return cache


def time_steps(model, cache, name: str, batch: int, steps: int, warmup: int) -> tuple[list[float], int | None]:
    """Milliseconds of each measured decode step, and the graphs captured (None: not a graph row)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, steps + warmup), device=DEV)
    flash = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if name.endswith("(flash)") else contextlib.nullcontext()
    times = []
    dec = None
    if name.endswith(GRAPH):  # its own warm-up steps come first, then the capture: inside `warmup` here
        dec = GraphDecoder(model, cache, max_length=int(cache.get_seq_length()) + steps + warmup,
                           mode="graph" if DEV == "cuda" else "static")
    with torch.inference_mode(), flash:
        for i in range(steps + warmup):
            if DEV == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            if dec is not None:
                dec.step(ids[:, i:i + 1])
            else:
                model(ids[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            if DEV == "cuda":
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) if DEV == "cuda" else (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
    return times, (dec.captures if dec is not None else None)


def kv_bytes(cache, context: int, batch: int) -> tuple[float, int]:
    """(bytes per token per sequence, slack bytes) of a filled cache, over the tokens it holds now."""
    if not isinstance(cache, smartkv.SmartKVCache):  # DynamicCache, StaticCache (its whole capacity)
        total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return total / (int(cache.get_seq_length()) * batch), 0
    return cache.memory_report().total_bytes / (cache.get_seq_length() * batch), cache.slack_bytes()


def free_all():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if DEV == "cuda" else 0.0


def run_row(model, name: str, batch: int, args) -> dict:
    free_all()
    t0 = time.time()
    cache = fill(model, *METHODS[name], batch, args.context, args.steps + args.warmup + 1, args.fill_chunk)
    fill_s = time.time() - t0
    fill_peak = peak_gib()   # where a peak comes from: the fill, or the decoding after it (graphs, flushes)
    times, captures = time_steps(model, cache, name, batch, args.steps, args.warmup)
    if isinstance(cache, smartkv.SmartKVCache):
        cache.end_static()  # no-op unless a graph row ran
    per_token, slack = kv_bytes(cache, args.context, batch)  # after decoding: SmartKV's window has been flushed
    mean = statistics.fmean(times)
    # tokens/s over every measured step (SmartKV's re-allocation steps included: its median step hides them)
    row = dict(name=name, batch=batch, context=args.context, step_ms=statistics.median(times), mean_ms=mean,
               max_ms=max(times),
               tokens_per_s=batch * 1e3 / mean,
               kv_bytes_per_token=per_token, kv_gib=per_token * batch * args.context / GIB, slack_gib=slack / GIB,
               peak_gib=peak_gib(), fill_peak_gib=fill_peak, fill_s=fill_s, captures=captures, step_ms_all=times)
    del cache
    free_all()
    return row


def estimate_max_batch(per_token: float, context: int, weights: int, total: int, reserve_gib: float) -> int:
    """Sequences whose KV fits beside the weights and a reserve for activations, workspace and fragmentation;
    DynamicCache's concatenation holds one more layer's K/V at a time (a 1/32 share, inside the reserve here)."""
    return max(1, int((total - weights - reserve_gib * GIB) // (per_token * context)))


def check_fused(model, notes: list, context: int = 4096, batch: int = 2, steps: int = 3):
    """Fused vs dequantize + SDPA on identically filled caches: logits of a few decode steps. Control: the same
    fp16 cache through two SDPA backends (flash, math), which shows how far a random 32-layer bf16 model carries
    attention rounding differences."""
    ids = torch.randint(0, model.config.vocab_size, (batch, steps), device=DEV)
    if DEV == "cuda":
        logits = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            cache = fill(model, "dynamic", {}, batch, context, steps)
            with torch.inference_mode(), sdpa_kernel(backend):
                logits.append(torch.cat([model(ids[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True).logits
                                         for i in range(steps)], 1).float())
        err = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
        agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
        notes.append(f"control, fp16 DynamicCache: flash vs math SDPA logits rel. error {err:.1e}, "
                     f"argmax agreement {agree:.0%}")
    for method, params in (("int8", {}), ("int4", {}), ("kivi", dict(key_bits=2, value_bits=2)), ("kivi", {}),
                           ("smartkv", dict(budget=4.25, key_value_gap=3))):
        logits = []
        for use_kernels in (True, False):
            cache = fill(model, method, dict(params, use_kernels=use_kernels), batch, context, steps)
            with torch.inference_mode():
                logits.append(torch.cat([model(ids[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True).logits
                                         for i in range(steps)], 1).float())
        err = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
        agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
        notes.append(f"{method} {params or ''}: fused vs dequantize+SDPA logits rel. error {err:.1e}, "
                     f"argmax agreement {agree:.0%} ({batch} x {context}, {steps} steps)")


def table(rows: list[dict], base: dict | None) -> list[str]:
    lines = ["| method | batch | median ms / step | mean ms | max ms | tokens/s (all steps) | vs first row | KV GiB | "
             "KV bytes/token/seq | peak GiB (fill's) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        lines.append(f"| {r['name']} | {r['batch']} | {r['step_ms']:.1f} | {r['mean_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | "
                     f"{vs} | {r['kv_gib']:.1f} | {r['kv_bytes_per_token']:.0f} | {r['peak_gib']:.1f} "
                     f"({r.get('fill_peak_gib', 0.0):.1f}) |")
    return lines


def write(out: Path | None, lines: list[str], rows: list[dict]):
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        (out / "bench_e2e.md").write_text(text + "\n")
        (out / "bench_e2e.json").write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="measured decode steps per row")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fill-chunk", type=int, default=2048,
                    help="tokens a cache append while filling (>= --context: one append, as a one-shot prefill)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", default=",".join(METHODS), help="comma-separated row names to run at --batch")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch rows")
    ap.add_argument("--max-rows", default=",".join(MAX_BATCH_ROWS), help="rows to run at their largest batch")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="memory kept free when estimating max batch")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="card memory to size the largest batches for (default: this card's; 79.2 = an 80 GB H100)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip rows that would start after this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tuning", default=None, metavar="JSON",
                    help="kernel launch configs from a bench_attention.json (what its --sweep kept)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, context 512: checks the script runs")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        import smartkv.cache.layer
        DEV, args.context, args.batch, args.steps, args.warmup, args.layers = "cpu", 512, 2, 2, 1, 2
        args.no_max_batch = True
        smartkv.cache.layer.FORCE_KERNELS = True  # with TRITON_INTERPRET=1: the fused path through the interpreter
    if args.tuning:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_speed_util import apply_tuning
        notes_tuning = [f"- kernel launch configs from {args.tuning}: {json.dumps(apply_tuning(args.tuning))}"]
    else:
        notes_tuning = []
    t_start = time.time()
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.layers, args.smoke)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card, total_memory = f"{props.name} ({props.multi_processor_count} SMs)", props.total_memory
        if args.memory_gib:
            # the allocator is held to that much too, so that a row which would not fit on such a card runs out
            # of memory here (and its largest batch is retried smaller) instead of borrowing this card's excess:
            # SmartKV at batch 50 (32K) peaked at 88.6 GiB on an H200 while sized for 79.2 (2026-11-29)
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * GIB / props.total_memory))
            card += f", largest batches sized for and held to {args.memory_gib} GiB"
            total_memory = int(args.memory_gib * GIB)
    else:
        card, total_memory = "CPU (smoke run)", weights + 8 * args.context * 2 ** 17 + int(args.reserve_gib * GIB)
    head = [f"- card: {card}, {total_memory / GIB:.1f} GiB; torch {torch.__version__}; "
            f"weights {weights / GIB:.1f} GiB ({args.layers} layers)",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"] + notes_tuning
    notes: list[str] = []
    check_fused(model, notes, context=min(4096, args.context))
    rows: list[dict] = []
    for name in args.rows.split(","):
        if time.time() - t_start > args.budget_s:
            notes.append(f"skipped {name}: budget")
            continue
        try:
            rows.append(run_row(model, name, args.batch, args))
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            notes.append(f"{name} at batch {args.batch} failed: {type(exc).__name__}: {exc}"[:300])
            free_all()
            continue
        write(out, head + notes + [""] + table(rows, rows[0]), rows)
    base = rows[0] if rows else None
    max_rows: list[dict] = []
    per_token = {r["name"]: r["kv_bytes_per_token"] for r in rows}
    for name in [] if args.no_max_batch else args.max_rows.split(","):
        if name not in per_token or time.time() - t_start > args.budget_s:
            continue
        batch = estimate_max_batch(per_token[name], args.context, weights, total_memory, args.reserve_gib)
        while batch >= 1:
            try:
                max_rows.append(dict(run_row(model, name, batch, args), estimated=True))
                break
            except torch.OutOfMemoryError:
                # 4% steps: the largest batch is the measurement (10% steps read it up to a tenth low)
                smaller = min(batch - 1, int(batch * 0.96))
                notes.append(f"{name}: batch {batch} ran out of memory; trying {smaller}")
                free_all()
                batch = smaller
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{name} at batch {batch} failed: {type(exc).__name__}: {exc}"[:300])
                free_all()
                break
    fp16_max = next((r for r in max_rows if r["name"].startswith("fp16")), base)
    write(out, head + notes + ["", f"At batch {args.batch}:", ""] + table(rows, base)
          + ["", "At each method's largest batch (vs fp16 DynamicCache SDPA at its largest):", ""]
          + table(max_rows, fp16_max), rows + max_rows)


if __name__ == "__main__":
    main()
