"""Quick validation of the baselines without loading any model (under a minute on a laptop CPU):

  - memory: every baseline's cache filled with 1024 tokens of synthetic fp16 K/V of gpt2's shape; payload ratios
    as the original table (FP16 1.00, INT8 0.50, INT4 0.25, KIVI 0.1875, SmartKV 0.40-0.60) and true totals
    (scales, zeros and full-precision windows counted) as the memory math says;
  - reconstruction error ordering: FP16 < INT8 < INT4 on keys and on values, and FP16 < INT8 < SmartKV (default
    budget) < INT4 on their mean (SmartKV gives keys more bits than values, `key_value_gap`, so its key error
    alone can fall below INT8's);
  - a decode-step latency micro-benchmark of the caches alone (printed, not checked).

    python scripts/test_validation.py        # exit code 0: all checks passed, 1: a check failed
"""
from __future__ import annotations

import sys
import time

import torch

from smartkv.experiments.baselines import BASELINES, decode_step_ms, fill_cache, measure_filled, model_shape

TOKENS = 1024
GROUP, RESIDUAL = 32, 128   # the int8/int4/kivi defaults the totals below assume
META_BITS = 32              # fp16 scale + fp16 zero per group
PAYLOAD = {"FP16": (1.0, 1.0), "INT8": (0.5, 0.5), "INT4": (0.25, 0.25), "KIVI": (0.1875, 0.1875),
           "SmartKV": (0.40, 0.60)}
# KIVI K2V4 after 1024 tokens: every key quantized (2 + 1 bits), values but the last 128 (4 + 1 bits), 128 at 16.
KIVI_TOTAL = ((2 + META_BITS / GROUP) * TOKENS + (4 + META_BITS / GROUP) * (TOKENS - RESIDUAL) + 16 * RESIDUAL) / (
    32 * TOKENS)
TOTAL = {"FP16": (1.0, 1.0), "INT8": ((8 + META_BITS / GROUP) / 16,) * 2, "INT4": ((4 + META_BITS / GROUP) / 16,) * 2,
         "KIVI": (KIVI_TOTAL, KIVI_TOTAL), "SmartKV": (None, 0.60)}  # SmartKV: at least its payload
ERROR_ORDER = ("FP16", "INT8", "SmartKV", "INT4")


def main() -> int:
    # Small tensors: a second thread gains little, and on a shared, busy machine it costs ten times the time.
    torch.set_num_threads(1)
    shape = model_shape("gpt2")
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    print(f"gpt2 shape {shape}, {TOKENS} tokens of synthetic fp16 K/V (outlier key channels)")
    measured, step_ms = {}, {}
    for name in BASELINES:
        start = time.perf_counter()
        cache, kv = fill_cache(name, shape, TOKENS)
        measured[name] = m = measure_filled(name, cache, kv)
        step_ms[name] = decode_step_ms(cache, kv, repeats=3)
        print(f"{name:8s} payload {m['payload_ratio']:.4f}  total {m['total_ratio']:.4f}  "
              f"avg bits {m['avg_bits']:.2f}  K err {m['key_rel_error']:.4f}  V err {m['value_rel_error']:.4f}  "
              f"({time.perf_counter() - start:.1f} s)")

    print("memory")
    fp16_bytes = 2 * shape["num_layers"] * shape["num_kv_heads"] * TOKENS * shape["head_dim"] * 2
    for name, m in measured.items():
        lo, hi = PAYLOAD[name]
        check(lo - 1e-6 <= m["payload_ratio"] <= hi + 1e-6, f"{name} payload ratio {m['payload_ratio']:.4f} in "
                                                            f"[{lo}, {hi}]")
        lo, hi = TOTAL[name]
        lo = m["payload_ratio"] if lo is None else lo
        check(lo - 1e-6 <= m["total_ratio"] <= hi + 1e-6, f"{name} total ratio {m['total_ratio']:.4f} in "
                                                          f"[{lo:.4f}, {hi:.4f}]")
        check(m["fp16_bytes"] == fp16_bytes, f"{name} counts {m['fp16_bytes']} fp16 bytes ({fp16_bytes} expected)")

    print("reconstruction error")
    uniform = [n for n in ERROR_ORDER if n != "SmartKV"]
    for kind in ("key_rel_error", "value_rel_error"):
        errors = [measured[n][kind] for n in uniform]
        order = " < ".join(f"{n} {e:.4f}" for n, e in zip(uniform, errors))
        check(all(a < b for a, b in zip(errors, errors[1:])), f"{kind}: {order}")
    errors = [(measured[n]["key_rel_error"] + measured[n]["value_rel_error"]) / 2 for n in ERROR_ORDER]
    order = " < ".join(f"{n} {e:.4f}" for n, e in zip(ERROR_ORDER, errors))
    check(all(a < b for a, b in zip(errors, errors[1:])), f"mean of key and value error: {order}")
    check(measured["FP16"]["key_rel_error"] == 0.0, "FP16 returns the keys exactly")

    print(f"decode-step cache latency at {TOKENS} tokens, {shape['num_layers']} layers (median of 3, not checked)")
    for name, ms in step_ms.items():
        print(f"  {name:8s} {ms:8.2f} ms")

    print("PASSED" if not failures else f"FAILED: {len(failures)} check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
