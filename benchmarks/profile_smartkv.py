"""Where SmartKV's decode time goes, on the embedded model: per-token time of each cache step, next to fp16 and int4.

    python benchmarks/profile_smartkv.py                          # CPU: 2K prompt, 32 decoded tokens
    python benchmarks/profile_smartkv.py --device cuda --context 8000 --tokens 64
    python benchmarks/profile_smartkv.py --device cuda --random      # SmolLM2's shapes, random weights and tokens

Wraps SmartKVLayer's steps with timers (synchronising CUDA around each, so the parts add up but the total runs
slower than unwrapped) and prints ms per decoded token per part, summed over layers. `attend` contains the
attention itself (the two-pass kernels on CUDA, dequantize + torch on CPU), `_observe` (importance statistics)
and `_flush` (re-allocation every `realloc_every` tokens: `_weights` with `_ranges`, `_allocate`, `_repool` with
`_gather_values`; `_stored_ranks` once per kind, inside the first of them). Parts nest (`_flush` contains the others; on CPU `_stored_kv`, the reference path's
dequantization, contains `_middle_part`), so the column does not sum to the total. The
unwrapped rows time whole decode steps of each method without any wrapper.
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.data.prose import prose_text
from smartkv.methods import smartkv as smartkv_mod
from smartkv.models import load_model, load_tiny

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import parse_config  # noqa: E402

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0)
SHAPES = {"smollm2": SMOLLM2_SHAPES,  # --random's shapes; llama3-8b: the GPU benchmarks' attention shapes
          "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)}
PARTS = ("attend", "_fused_decode", "_observe", "_flush", "_middle_part", "_weights", "_allocate",
         "_repool", "_gather_values", "_stored_ranks", "_ranges", "_stored_kv", "_store")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms(model, ids, method: str, params: dict, tokens: int, device, after_prefill=None) -> float:
    """Milliseconds per decoded token (greedy) after prefilling `ids` through a fresh cache of `method`."""
    cache = smartkv.make_cache(method, model, **params)
    with torch.inference_mode():
        out = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)  # no (B, T, vocab) logits
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        if after_prefill:
            after_prefill()
        start = time.perf_counter()
        for _ in range(tokens):
            nxt = model(nxt, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
    return (time.perf_counter() - start) / tokens * 1e3


def instrument(device) -> tuple[dict, collections.Counter]:
    spent, calls = collections.defaultdict(float), collections.Counter()
    for name in PARTS:
        original = getattr(smartkv_mod.SmartKVLayer, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def timed(self, *args, _original=original, _name=name, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                _sync(device)
                spent[_name] += time.perf_counter() - start
                calls[_name] += 1
        setattr(smartkv_mod.SmartKVLayer, name, timed)
    return spent, calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens (CPython prose)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens timed")
    p.add_argument("--params", default="budget=4.25,key_value_gap=3", help="smartkv parameters, k=v,...")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (--random only)")
    p.add_argument("--torch-profile", type=int, default=0, metavar="ROWS",
                   help="also print torch.profiler's top ROWS ops (self CPU time) over SmartKV's timed decode")
    p.add_argument("--cprofile", type=int, default=0, metavar="ROWS",
                   help="also print cProfile's top ROWS Python functions (own and cumulative time) over it")
    p.add_argument("--random", action="store_true",
                   help="a random-weight Llama of SmolLM2's shapes and random tokens (no model files needed)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="--random's model shapes")
    p.add_argument("--layers", type=int, default=None, help="--random's layer count (default: the shape's)")
    p.add_argument("--methods", default="fp16,int4", help="unwrapped rows timed next to smartkv (or 'none')")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(a.device)
    if a.random:
        shapes = dict(SHAPES[a.shape])
        if a.layers:
            shapes["num_hidden_layers"] = a.layers
        handle = load_tiny("tiny-llama", device=a.device, dtype=torch.bfloat16 if device.type == "cuda" else
                           torch.float32, **shapes, max_position_embeddings=max(8192, a.context + 1024))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, shapes["vocab_size"], (a.batch, a.context), generator=gen)
        ids = ids.to(device)
    else:
        handle = load_model("smollm2", device=a.device)
        ids = torch.tensor([handle.tokenizer.encode(prose_text())[1000:1000 + a.context]], device=device)
    params = parse_config(f"smartkv:{a.params}")[1]
    print(f"device {a.device}, context {a.context}, {a.tokens} decoded tokens, smartkv {a.params}", flush=True)
    rows = []
    others = [] if a.methods == "none" else [(m, {}) for m in a.methods.split(",")]
    for m, pr in others + [("smartkv", params)]:
        decode_ms(handle.model, ids, m, pr, 40, device)  # warm-up past re-allocations: kernels compiled
        rows.append((m, decode_ms(handle.model, ids, m, pr, a.tokens, device)))
        print(f"  {m}: {rows[-1][1]:.2f} ms / token", flush=True)
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            decode_ms(handle.model, ids, "smartkv", params, a.tokens, device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.torch_profile))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.torch_profile))
    if a.cprofile:  # host time per Python function (the decode step is launch-bound on a GPU)
        import cProfile
        import pstats
        prof = cProfile.Profile()
        decode_ms(handle.model, ids, "smartkv", params, a.tokens, device, after_prefill=prof.enable)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.cprofile)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(a.cprofile)
    spent, calls = instrument(device)
    total = decode_ms(handle.model, ids, "smartkv", params, a.tokens, device,
                      after_prefill=lambda: (spent.clear(), calls.clear()))
    print("\n| method (unwrapped) | ms / token |\n|---|---|")
    for m, ms in rows:
        print(f"| {m} | {ms:.2f} |")
    print(f"\n| smartkv part (instrumented run: {total:.2f} ms / token) | calls / token | ms / token |\n|---|---|---|")
    for name in PARTS:
        if calls[name]:
            print(f"| `{name}` | {calls[name] / a.tokens:.2f} | {spent[name] / a.tokens * 1e3:.2f} |")


if __name__ == "__main__":
    main()
