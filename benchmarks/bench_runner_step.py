"""The runner's prefill and decode speed per method, without Ray or the embedded weights: the runner's own
`generation.decode` on a SmolLM2-135M-shaped model (Llama architecture, 30 layers, 3 KV heads of 64, random bf16
weights), one request at a time, in each decode mode asked for (eager, as the runner decodes by default, and auto:
CUDA graphs where the cache can be captured, captures counted in the decode time as the runner counts them).

What it leaves out against the runner (jobs/smartkv_speed*.yaml): the eight workers sharing one GPU, the prompts'
text (random tokens: the attention, hence SmartKV's widths, differ, its cost does not depend on them), scoring.
Ratios are against int4 in the same mode and run: the issue 21 runner goal is decode ms a token <= 1.3x int4's
and prefill tokens/s >= 0.5x int4's.

    PYTHONPATH=. python benchmarks/bench_runner_step.py --context 8000 --new 32 --repeats 3    # CUDA
    PYTHONPATH=. python benchmarks/bench_runner_step.py --smoke                                # CPU: the code path
    PYTHONPATH=. python benchmarks/bench_runner_step.py --modes eager --rows 'int4,smartkv (default)' --steps  # steps
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import smartkv
from bench_speed_util import parse_with_cuda
from smartkv.bench.run.generation import decode
from smartkv.kernels import batched, launch

METHODS = {  # row name -> (method, params); jobs/smartkv_speed_append.yaml runs the first three
    "int4": ("int4", {}),
    "smartkv (default)": ("smartkv", dict(budget=4.25, key_value_gap=3)),
    # the default before append (per-kind widths re-allocated every 16 tokens)
    "smartkv incremental": ("smartkv", dict(budget=4.25, key_value_gap=3, realloc="incremental", joint=False,
                                            class_norm="exact")),
    "smartkv append": ("smartkv", dict(budget=4.25, key_value_gap=3, realloc="append", class_norm="exact")),
    "smartkv append fold": ("smartkv", dict(budget=4.25, key_value_gap=3, realloc="append", joint=True,
                                            class_norm="previous")),
}


def smollm2_config(smoke: bool) -> LlamaConfig:
    if smoke:
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=16384,
                       rope_theta=100000.0, tie_word_embeddings=True)


def build(smoke: bool, device: str, layers: int | None = None) -> LlamaForCausalLM:
    """The SmolLM2-shaped model with random weights (bf16 off the CPU), all its layers or the first `layers`."""
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg = smollm2_config(smoke)
    cfg.num_hidden_layers = layers or cfg.num_hidden_layers
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def prompt_tokens(model, context: int) -> list[int]:
    """The benchmark's prompt: `context` random token ids (seed 0), the same in every process and run."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (context,), generator=gen).tolist()


def measure(model, name: str, mode: str, prompt: list[int], new: int, steps: bool = False) -> dict:
    """One request. With `steps`, also each decode forward's wall ms (synchronised around it: what a step costs,
    a flushing one among them), under "steps"."""
    method, params = METHODS[name]
    cache = smartkv.make_cache(method, model, **params)
    times, forward = [], model.forward
    if steps:
        def timed(*args, **kwargs):
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            start = time.perf_counter()
            result = forward(*args, **kwargs)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            return result
        model.forward = timed
    try:
        out = decode(model, prompt, cache, new, forced=[1] * new, keep_logits=False, mode=mode)
    finally:
        model.forward = forward
    return {"prefill_tok_s": len(prompt) / out.prefill_ms * 1e3, "ms_token": out.decode_ms_per_token,
            "mode": out.mode, **({"steps": [round(t, 2) for t in times[1:]]} if steps else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8000, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="tokens a request produces (the runner's max_new_tokens)")
    ap.add_argument("--repeats", type=int, default=3, help="requests a row, after one warm-up; medians reported")
    ap.add_argument("--modes", default="eager,auto")
    ap.add_argument("--rows", default=",".join(METHODS), help="comma-separated row names; int4 first: the base")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on CPU")
    ap.add_argument("--ab", metavar="VAR[=A,B]", help="each row with the environment variable VAR at 0 and at 1 "
                    "(or at A and at B), interleaved in this process (e.g. SMARTKV_BATCH_SEGMENTS, "
                    "SMARTKV_FIRST_GROUP=1,8)")
    ap.add_argument("--steps", action="store_true", help="print each row's last request's decode steps, ms each "
                    "(a flushing step among them; the steps are synchronised, so the ms a token differ a little)")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args, override = parse_with_cuda(ap)
    with override:
        run(args)


def ab_setting(ab: str) -> tuple[str, list[str]]:
    """`--ab`'s variable and its two values (0 and 1 unless named)."""
    var, _, values = ab.partition("=")
    return var, values.split(",") if values else ["0", "1"]


def ab_rows(model, rows: list[str], mode: str, prompt: list[int], args) -> list[dict]:
    """Each row with $VAR at 0 and at 1 (`--ab VAR`, or the values `--ab VAR=A,B` names), interleaved request by
    request in this process, so that the host's drift between processes (up to ~40% on the GPU hosts) does not
    enter the comparison. Row names gain " [VAR=v]"; the first row's first setting is the base."""
    var, values = ab_setting(args.ab)
    runs = {(name, v): [] for name in rows for v in values}
    for rep in range(args.repeats + 1):   # the first round warms up (compilation, captures)
        for name in rows:
            for v in values:
                os.environ[var] = v
                r = measure(model, name, mode, prompt, args.new)
                if rep:
                    runs[(name, v)].append(r)
    os.environ.pop(var)
    return [{"row": f"{name} [{var}={v}]", "asked": mode, "mode": rs[0]["mode"],
             **{k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "ms_token")}}
            for (name, v), rs in runs.items()]


def run(args) -> None:
    rows, modes = args.rows.split(","), args.modes.split(",")
    for r in rows:
        if r not in METHODS:
            raise SystemExit(f"--rows: unknown row {r!r}; allowed: {', '.join(METHODS)}")
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.context, args.new, args.repeats, modes = min(args.context, 512), min(args.new, 20), 1, ["eager"]
    model = build(args.smoke, device)
    prompt = prompt_tokens(model, args.context)
    results = []
    for mode in modes:
        if args.ab:
            results += ab_rows(model, rows, mode, prompt, args)
            continue
        for name in rows:
            measure(model, name, mode, prompt, args.new)   # warm-up: compilation, captures' first costs
            runs = [measure(model, name, mode, prompt, args.new, args.steps) for _ in range(args.repeats)]
            results.append({"row": name, "asked": mode, "mode": runs[0]["mode"],
                            **{k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "ms_token")}})
            if args.steps:
                st = runs[-1]["steps"]
                print(f"{name} ({mode}): decode steps, ms: {' '.join(f'{t:.0f}' for t in st)} (median "
                      f"{statistics.median(st):.1f}, largest {max(st):.1f})", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"{args.context} prompt tokens, {args.new} new, median of {args.repeats}; ratios against the first row "
          "in the same mode")
    print("| row | asked | ran | prefill tok/s | prefill vs base | ms a token | ms a token vs base |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    var, values = ab_setting(args.ab) if args.ab else (None, None)
    first = f"{rows[0]} [{var}={values[0]}]" if args.ab else rows[0]
    for r in results:
        base = next(b for b in results if b["asked"] == r["asked"] and b["row"] == first)
        print(f"| {r['row']} | {r['asked']} | {r['mode']} | {r['prefill_tok_s']:,.0f} | "
              f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x | {r['ms_token']:.2f} | "
              f"{r['ms_token'] / base['ms_token']:.2f}x |")
    print(f"launches: direct/bound {launch.STATS}; batched segments' tables built / launches {batched.STATS}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
