"""Every method on the embedded Gemma 3 270M past its 512-token sliding window: bytes held against DynamicCache's,
and agreement with the fp16 cache (CPU).

One prompt of `--ctx` tokens of CPython's bundled documentation prose, then `--new` tokens:
  - DynamicCache and the fp16 cache generate greedily: their tokens and logits must be identical;
  - each method is fed fp16's tokens (teacher forcing: KL(fp16 || method) and top-1 agreement over the decode
    positions, the prefill's position left out: every method attends to the prompt at full precision there);
    with --free it also generates greedily (share of tokens equal to fp16's, first divergence);
  - bytes: memory_report() after the forced run, sliding and full layers apart, against DynamicCache's bytes
    (at 16 bits: `fp16_bytes`; the model runs in fp32 on the CPU) and against a full-length cache on every layer.

    python benchmarks/bench_gemma3.py                     # the long check (~1 h on 2 busy cores)
    python benchmarks/bench_gemma3.py --configs 'int4;int4:sliding_layers=fp16'
    python benchmarks/bench_gemma3.py --ctx 700 --new 6 --configs all   # what tests/test_cache_gemma3.py bounds
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache

import smartkv
from smartkv.bench.run.generation import decode
from smartkv.data.prose import prose_text
from smartkv.metrics.quality import kl_divergence, top1_agreement
from smartkv.models import load_model, model_kv_shape

DEFAULT_CONFIGS = ("int8", "int4", "int4:sliding_layers=fp16", "kivi", "kivi:key_bits=2,value_bits=2",
                   "smartkv:budget=4", "smartkv", "fp8", "zipcache", "quanto", "hqq")


def parse_config(spec: str) -> tuple[str, dict]:
    method, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        for cast in (int, float, str):
            try:
                params[key] = cast(raw)
                break
            except ValueError:
                continue
    return method, params


def layer_split(report, cache) -> dict:
    """Bytes held on sliding and on full-attention layers, and the most tokens a sliding layer holds."""
    sliding = [i for i, layer in enumerate(cache.layers) if layer.is_sliding]
    held = lambda i: sum(report.per_layer[i][k] for k in ("payload", "metadata", "residual"))  # noqa: E731
    return {"sliding_bytes": sum(held(i) for i in sliding),
            "full_bytes": sum(held(i) for i in range(len(cache.layers)) if i not in sliding),
            "sliding_tokens_max": max(report.per_layer[i]["tokens"] for i in sliding)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=1500)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                    help="';'-separated method[:k=v,...] specs, or 'all': every registered method at its defaults")
    ap.add_argument("--free", action="store_true", help="also a free greedy run per method")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = smartkv.list_methods() if args.configs == "all" else args.configs.split(";")
    configs = [c for c in configs if parse_config(c)[0] in smartkv.list_methods()]   # quanto, hqq: when installed
    handle = load_model("gemma3", device="cpu")
    model, tok = handle.model, handle.tokenizer
    ids = tok(prose_text(), return_tensors="pt")["input_ids"][0, 1000:1000 + args.ctx].tolist()

    dyn = DynamicCache(config=model.config)
    ref = decode(model, ids, dyn, args.new)
    dyn_bytes = sum(layer.keys.numel() + layer.values.numel() for layer in dyn.layers) * 2   # at 16 bits
    fp16_cache = smartkv.make_cache("fp16", model)
    fp16 = decode(model, ids, fp16_cache, args.new)
    same = fp16.tokens == ref.tokens and torch.equal(fp16.logits, ref.logits)
    print(f"fp16 == DynamicCache (tokens and logits, {args.ctx} + {args.new}): {same}; fp16 cache holds "
          f"{fp16_cache.memory_report().total_bytes} B in the model's dtype ({model.dtype})")
    shape = model_kv_shape(model)
    full_length = 2 * 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * (args.ctx + args.new - 1)
    print(f"DynamicCache holds {dyn_bytes} B at 16 bits; a full-length cache on every layer {full_length} B")
    rows = []
    for spec in configs:
        method, params = parse_config(spec)
        start = time.perf_counter()
        forced_cache = smartkv.make_cache(method, model, **params)
        forced = decode(model, ids, forced_cache, args.new, forced=ref.tokens)
        report = forced_cache.memory_report()
        free = decode(model, ids, smartkv.make_cache(method, model, **params), args.new) if args.free else None
        match = [a == b for a, b in zip(free.tokens, ref.tokens)] if free else [None]
        row = {"config": spec, "total_bytes": report.total_bytes, "vs_dynamic": report.total_bytes / dyn_bytes,
               "fp16_bytes_is_dynamic": report.fp16_bytes == dyn_bytes, **layer_split(report, forced_cache),
               "kl": kl_divergence(ref.logits[1:], forced.logits[1:]).mean().item(),
               "top1": top1_agreement(ref.logits[1:], forced.logits[1:]),
               "free_match": sum(match) / len(match) if free else None,
               "first_divergence": match.index(False) if False in match else None,
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| config | total B | / DynamicCache | sliding B | full B | sliding tokens max | KL | top-1 | free match |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['total_bytes']} | {r['vs_dynamic']:.3f} | {r['sliding_bytes']} | {r['full_bytes']}"
              f" | {r['sliding_tokens_max']} | {r['kl']:.2e} | {r['top1']:.3f} | {r['free_match']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ctx": args.ctx, "new": args.new, "fp16_equals_dynamic": same, "dynamic_bytes": dyn_bytes,
                       "full_length_bytes": full_length, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
