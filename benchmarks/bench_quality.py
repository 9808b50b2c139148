"""Decode-path quality of every KV-cache method on the embedded model (CPU), against the fp16 cache.

Per window: prefill `ctx` tokens of prose through the method's cache, then feed the next `decode` tokens one at a
time (teacher forcing), so every scored token reads the quantized cache. The prose is the evaluation part of a
source that ships with CPython (smartkv.data.prose: `--source pydoc|docstrings`, `--part evaluation` by default;
choose settings with `--part tuning`, never on the evaluation part); windows start at evenly spaced offsets of it
and do not overlap. Reported per method, averaged over windows:
  total_ratio  memory_report().total_ratio after the last token (everything counted / fp16 bytes)
  alloc_ratio  the same with the slack of growable buffers (allocated, not yet used) added
  kl           KL(fp16 || method) of next-token distributions, mean over decoded positions; [lo, hi] is a 95%
               bootstrap interval over windows, and dKL the paired difference to `--reference` on the same windows
  ppl          perplexity of the true next tokens over the decoded positions
  top1         share of positions where the method's argmax equals the fp16 cache's argmax

    python benchmarks/bench_quality.py                       # the BENCHMARKS.md table (~25 min, 1 core)
    python benchmarks/bench_quality.py --configs 'int4;kivi:key_bits=4,value_bits=4,residual_length=32'
    python benchmarks/bench_quality.py --ablation all --ctx 256 --decode 32 --windows 8    # SmartKV's parts
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import smartkv
from smartkv.bench.results.stats import bootstrap_ci
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.data.prose import PARTS, SOURCES, prose_text

# The KIVI-2 memory point: importance_power=1 chosen on both models' tuning parts (BENCHMARKS.md, "Ablation")
SMARTKV_LOW = "group_size=64,recent_window=8,realloc_every=8,importance_power=1"
DEFAULT_CONFIGS = (
    "int8", "int4",
    "kivi:key_bits=4,value_bits=4,residual_length=32",
    "kivi:key_bits=2,value_bits=2,residual_length=32",
    "kivi:key_bits=2,value_bits=2,residual_length=128",
    f"smartkv:budget=2.4,key_value_gap=1,{SMARTKV_LOW}",
    "smartkv:budget=3,key_value_gap=2,group_size=64,recent_window=16,realloc_every=8",
    "smartkv:budget=4.25,key_value_gap=3",
    "smartkv:budget=4.25,key_value_gap=3,importance_floor=1",
    "smartkv:budget=6",
    "smartkv",
)
# the int4 memory point: importance_floor=1 chosen on both models' tuning parts (BENCHMARKS.md, "Ablation")
SMARTKV_INT4 = "smartkv:budget=4.25,key_value_gap=3,importance_floor=1"
# SmartKV with attention importance on/off and per-channel key normalisation on/off at both memory points, against
# the baselines at (or near) the same total bytes
SMARTKV_KIVI2 = f"smartkv:budget=2.4,key_value_gap=1,{SMARTKV_LOW}"
ABLATIONS = {
    "int4": ("int4", "kivi:key_bits=4,value_bits=4,residual_length=32",
             "zipcache:high_bits=8,low_bits=4,salient_ratio=0.15", "quanto",
             SMARTKV_INT4, f"{SMARTKV_INT4},importance=uniform", f"{SMARTKV_INT4},key_norm=none",
             f"{SMARTKV_INT4},importance=uniform,key_norm=none"),
    "kivi2": ("kivi:key_bits=2,value_bits=2,residual_length=32", "zipcache:salient_ratio=0.4", "quanto:nbits=2",
              SMARTKV_KIVI2, f"{SMARTKV_KIVI2},importance=uniform", f"{SMARTKV_KIVI2},key_norm=none",
              f"{SMARTKV_KIVI2},importance=uniform,key_norm=none"),
}
# Issue 22's frontier: every baseline (uniform, KIVI 2/2 2/4 4/4 at R32 and R128, ZipCache, fp8, quanto) against
# a SmartKV budget sweep, plus both memory points' ablations
FRONTIER = tuple(dict.fromkeys((
    "int8", "fp8", "int4",
    *(f"kivi:key_bits={k},value_bits={v},residual_length={r}" for k, v in ((4, 4), (2, 4), (2, 2)) for r in (32, 128)),
    "zipcache", "zipcache:high_bits=8,low_bits=4,salient_ratio=0.15", "zipcache:salient_ratio=0.4",
    "quanto", "quanto:nbits=2",
    *DEFAULT_CONFIGS[5:], *ABLATIONS["int4"], *ABLATIONS["kivi2"])))


@dataclass
class Window:
    prompt: torch.Tensor      # (1, ctx) token ids
    targets: torch.Tensor     # (1, decode + 1): fed one at a time; position i predicts targets[i + 1]


def parse_config(spec: str) -> tuple[str, dict]:
    """'kivi:key_bits=4,value_bits=4' -> ("kivi", {"key_bits": 4, "value_bits": 4}); a tuple of ints is written
    with slashes: 'smartkv:widths=2/4/8' -> ("smartkv", {"widths": (2, 4, 8)})."""
    method, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        if "/" in raw and all(part.strip().isdigit() for part in raw.split("/")):
            params[key.strip()] = tuple(int(part) for part in raw.split("/"))
            continue
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = {"true": True, "false": False}.get(raw.lower(), raw)
        params[key.strip()] = value
    return method.strip(), params


def make_windows(tokenizer, ctx: int, decode: int, count: int = 3, source: str = "pydoc",
                 part: str = "evaluation") -> list[Window]:
    """`count` windows at evenly spaced starts of the part's text (first at 0, last ending at its end)."""
    ids = torch.tensor(tokenizer(prose_text(source, part), add_special_tokens=False)["input_ids"])
    span = ctx + decode + 1
    if count * span > len(ids):
        raise ValueError(f"windows: {count} windows of {span} tokens do not fit in the {source} prose's {part} part "
                         f"({len(ids)} tokens); at most {len(ids) // span}")
    out = []
    for i in range(count):
        start = i * (len(ids) - span) // max(count - 1, 1)
        chunk = ids[start:start + span].unsqueeze(0)
        out.append(Window(chunk[:, :ctx], chunk[:, ctx:]))
    return out


@torch.inference_mode()
def decode_logprobs(model, window: Window, cache) -> torch.Tensor:
    """Log-probabilities (decode, vocab) of the next token at each decoded position, through `cache`."""
    # its own prediction reads no stored token (and one row of logits: Gemma 3 has 262K tokens)
    model(window.prompt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    steps = []
    for i in range(window.targets.shape[1] - 1):
        out = model(window.targets[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.log_softmax(torch.cat(steps, 0).float(), -1)


def score(ref: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> dict:
    """ref, logp (N, V) log-probs; targets (N,) true next tokens."""
    kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
    nll = -logp.gather(-1, targets.unsqueeze(-1)).mean().item()
    top1 = (ref.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return {"kl": kl, "nll": nll, "top1": top1}


def evaluate(model, windows: list[Window], configs: list[str], log=None) -> list[dict]:
    """One row per config: means over windows, plus `kl_windows` (per-window KL) and its bootstrap interval."""
    refs = [decode_logprobs(model, w, smartkv.make_cache("fp16", model)) for w in windows]
    rows = []
    # the reference itself (an fp16 cache: ratio 1, KL 0, agreement 1 by definition)
    nll = sum(score(r, r, w.targets[0, 1:])["nll"] for w, r in zip(windows, refs)) / len(refs)
    rows.append({"config": "fp16 (reference)", "total_ratio": 1.0, "alloc_ratio": 1.0, "avg_bits": 16.0, "kl": 0.0,
                 "nll": nll, "ppl": math.exp(nll), "top1": 1.0, "seconds": 0.0, "kl_windows": [0.0] * len(refs)})
    for spec in configs:
        method, params = parse_config(spec)
        t0 = time.perf_counter()
        per = []
        for w, ref in zip(windows, refs):
            cache = smartkv.make_cache(method, model, **params)
            logp = decode_logprobs(model, w, cache)
            s = score(ref, logp, w.targets[0, 1:])
            report = cache.memory_report()
            s.update(total_ratio=report.total_ratio, avg_bits=report.avg_bits,
                     alloc_ratio=(report.total_bytes + cache.slack_bytes()) / report.fp16_bytes)
            per.append(s)
        row = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
        row.update(ppl=math.exp(row["nll"]), config=spec, seconds=time.perf_counter() - t0,
                   kl_windows=[p["kl"] for p in per])
        rows.append(row)
        if log:
            log(row)
    return rows


def with_intervals(rows: list[dict], reference: str | None) -> list[dict]:
    """Add kl_lo/kl_hi (bootstrap over windows) and, against the `reference` config, dkl with its interval."""
    ref = next((r for r in rows if r["config"] == reference), None)
    for r in rows:
        r["kl_lo"], r["kl_hi"] = bootstrap_ci(r["kl_windows"])
        if ref is not None:
            diff = [a - b for a, b in zip(r["kl_windows"], ref["kl_windows"], strict=True)]
            r["dkl"] = sum(diff) / len(diff)
            r["dkl_lo"], r["dkl_hi"] = bootstrap_ci(diff)
    return rows


def _interval(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) else f"[{lo:.4g}, {hi:.4g}]"


def markdown(rows: list[dict], reference: str | None = None) -> str:
    """The table; with KL intervals (and the paired dKL to `reference`) where `with_intervals` added them."""
    fp = next((r for r in rows if r["config"].startswith("fp16")), None)
    stats = "kl_lo" in rows[0]
    paired = stats and reference is not None and "dkl" in rows[0]
    head = "| config | total_ratio | alloc_ratio | avg_bits | KL(fp16‖m) |" + (" 95% CI |" if stats else "")
    head += f" dKL vs `{reference}` [95% CI] |" if paired else ""
    lines = [head + " ppl | Δppl | top-1 agree |", "|" + "---|" * (head.count("|") + 2)]
    for r in rows:
        dppl = f"{100 * (r['ppl'] / fp['ppl'] - 1):+.2f}%" if fp else ""
        line = (f"| `{r['config']}` | {r['total_ratio']:.4f} | {r.get('alloc_ratio', math.nan):.4f} | "
                f"{r['avg_bits']:.2f} | {r['kl']:.5f} |")
        line += f" {_interval(r['kl_lo'], r['kl_hi'])} |" if stats else ""
        line += f" {r['dkl']:+.4g} {_interval(r['dkl_lo'], r['dkl_hi'])} |" if paired else ""
        lines.append(line + f" {r['ppl']:.3f} | {dppl} | {100 * r['top1']:.1f}% |")
    return "\n".join(lines)


def parse_shard(parser, text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        parser.error(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def merged_rows(pattern: str) -> list[dict]:
    """The rows of every file matching `pattern`, one per config (each shard has its own fp16 reference row, the
    same windows' numbers)."""
    rows = {}
    for path in sorted(glob.glob(pattern)):
        for r in json.loads(Path(path).read_text()):
            rows.setdefault(r["config"], r)
    return list(rows.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, default=1536, help="prefill tokens per window")
    p.add_argument("--decode", type=int, default=128, help="tokens fed one at a time after the prefill")
    p.add_argument("--windows", type=int, default=3, help="windows, evenly spaced over the part's text")
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                   help="';'-separated method[:k=v,...] specs, e.g. 'int4;smartkv:budget=4'")
    p.add_argument("--ablation", choices=(*ABLATIONS, "all", "frontier"), default=None,
                   help="instead of --configs: the ablation at one memory point (ABLATIONS), both ('all'), or "
                        "every baseline against the SmartKV sweep and both ablations ('frontier')")
    p.add_argument("--reference", default=None, help="config for the paired dKL column (a spec in the run)")
    p.add_argument("--model", default="smollm2", help="model name for smartkv.models.load_model")
    p.add_argument("--source", default="pydoc", choices=SOURCES, help="prose source")
    p.add_argument("--part", default="evaluation", choices=PARTS,
                   help="document part: evaluation for reports, tuning to choose settings")
    p.add_argument("--json", default=None, help="also write the rows (per-window KL included) here")
    p.add_argument("--from-json", default=None,
                   help="print the table of rows written by --json (no run); a glob merges shards' files")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th config from the I-th (processes sharing a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    a = p.parse_args(argv)
    if a.from_json:
        rows = merged_rows(a.from_json)
        if not rows:
            p.error(f"--from-json: no rows in files matching {a.from_json!r}")
        print(markdown(with_intervals(rows, a.reference), a.reference))
        return
    shard, shards = parse_shard(p, a.shard)
    torch.set_num_threads(a.threads)
    from smartkv.models import load_model
    handle = load_model(a.model)
    windows = make_windows(handle.tokenizer, a.ctx, a.decode, a.windows, a.source, a.part)
    if a.ablation == "frontier":
        configs = list(FRONTIER)
    elif a.ablation:
        configs = [c for point, cs in ABLATIONS.items() if a.ablation in (point, "all") for c in cs]
    else:
        configs = [c for c in a.configs.split(";") if c.strip()]
    configs = [c for c in configs if parse_config(c)[0] in smartkv.list_methods()]  # quanto: when installed
    configs = configs[shard::shards]
    done = []

    def log(row):
        print(f"# {row['config']}: ratio {row['total_ratio']:.4f} KL {row['kl']:.5f} ppl {row['ppl']:.3f} "
              f"top1 {100 * row['top1']:.1f}% ({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
        done.append(row)
        if a.json:  # after every config, so a stopped run keeps what it finished
            Path(a.json).write_text(json.dumps(done, indent=1))

    rows = with_intervals(evaluate(handle.model, windows, configs, log), a.reference)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"{a.model}, {a.source} prose ({a.part} part), ctx {a.ctx}, decode {a.decode}, windows {len(windows)}, "
          f"torch {torch.__version__}\n")
    print(markdown(rows, a.reference))


if __name__ == "__main__":
    main()
