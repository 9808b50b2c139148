"""How SmartKV's stored tokens fall into joint (key width, value width) classes (docs/smartkv.md, "Joint classes").

After each tuning-part window (prefill, then teacher-forced decoding through the cache), per config: the share of
stored tokens off one staircase (a class whose value width is above that of a class with a wider key), how many
layers hold the same class counts in every row (sequence x KV head), and the classes' shares. With --layers, each
layer's classes in the first window.

    python benchmarks/class_counts.py --model smollm2 --configs 'smartkv:budget=4.25,key_value_gap=3'
"""
from __future__ import annotations

import argparse
import collections

import torch

import smartkv
from bench_quality import decode_logprobs, make_windows, parse_config
from smartkv.models import load_model


def row_classes(layer) -> list[collections.Counter]:
    k, v = (layer.level_bits(kind).flatten(0, 1) for kind in ("k", "v"))
    return [collections.Counter(zip(kr.tolist(), vr.tolist())) for kr, vr in zip(k, v)]


def off_staircase(counts: collections.Counter) -> int:
    """Tokens of classes whose value width is above that of a class with a wider (or equal) key width."""
    off, lowest_v = 0, None
    for kw, vw in sorted(counts, key=lambda c: (-c[0], -c[1])):
        if lowest_v is not None and vw > lowest_v:
            off += counts[(kw, vw)]
        lowest_v = vw if lowest_v is None else min(lowest_v, vw)
    return off


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", required=True, help="';'-separated smartkv specs")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--layers", action="store_true", help="each layer's classes in the first window")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    handle = load_model(args.model, device="cpu", dtype="float32")
    windows = make_windows(handle.tokenizer, args.ctx, args.decode + 1, count=args.windows, part="tuning")
    for spec in args.configs.split(";"):
        method, params = parse_config(spec)
        off = total = equal = layers = 0
        shares = collections.Counter()
        for i, window in enumerate(windows):
            cache = smartkv.make_cache(method, handle.model, **params)
            decode_logprobs(handle.model, window, cache)
            for layer in cache.layers:
                rows = row_classes(layer)
                equal += all(r == rows[0] for r in rows)
                layers += 1
                for r in rows:
                    shares.update(r)
                    off += off_staircase(r)
                    total += sum(r.values())
                if args.layers and i == 0:
                    print(f"  sliding {layer.sliding_window}: {sorted(rows[0].items(), reverse=True)}")
        classes = ", ".join(f"({k},{v}) {n / total:.3f}" for (k, v), n in sorted(shares.items(), reverse=True))
        print(f"{spec}: off one staircase {off / total:.4f} of stored tokens; equal class counts in every row in "
              f"{equal} of {layers} layers; classes {classes}", flush=True)


if __name__ == "__main__":
    main()
