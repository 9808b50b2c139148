"""Decode-path quality of every KV-cache method on the embedded model (CPU), against the fp16 cache.

Per window: prefill `ctx` tokens of CPython's bundled documentation prose through the method's cache, then feed
the next `decode` tokens one at a time (teacher forcing), so every scored token reads the quantized cache.
Reported per method, averaged over windows taken at fixed offsets of the text:
  total_ratio  memory_report().total_ratio after the last token (everything counted / fp16 bytes)
  kl           KL(fp16 || method) of next-token distributions, mean over decoded positions
  ppl          perplexity of the true next tokens over the decoded positions
  top1         share of positions where the method's argmax equals the fp16 cache's argmax

    python benchmarks/bench_quality.py                       # the BENCHMARKS.md table (~25 min, 1 core)
    python benchmarks/bench_quality.py --configs 'int4;kivi:key_bits=4,value_bits=4,residual_length=32'
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch

import smartkv
from smartkv.data.prose import prose_text

OFFSETS = (0.1, 0.4, 0.7)   # window starts, as fractions of the tokenized text
SMARTKV_LOW = "group_size=64,recent_window=8,realloc_every=8,importance=uniform"  # the KIVI-2 memory point
DEFAULT_CONFIGS = (
    "int8", "int4",
    "kivi:key_bits=4,value_bits=4,residual_length=32",
    "kivi:key_bits=2,value_bits=2,residual_length=32",
    "kivi:key_bits=2,value_bits=2,residual_length=128",
    f"smartkv:budget=2.4,key_value_gap=1,{SMARTKV_LOW}",
    "smartkv:budget=3,key_value_gap=2,group_size=64,recent_window=16,realloc_every=8",
    "smartkv:budget=4.25,key_value_gap=3",
    "smartkv:budget=6",
    "smartkv",
)


@dataclass
class Window:
    prompt: torch.Tensor      # (1, ctx) token ids
    targets: torch.Tensor     # (1, decode + 1): fed one at a time; position i predicts targets[i + 1]


def parse_config(spec: str) -> tuple[str, dict]:
    """'kivi:key_bits=4,value_bits=4' -> ("kivi", {"key_bits": 4, "value_bits": 4})."""
    method, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = {"true": True, "false": False}.get(raw.lower(), raw)
        params[key.strip()] = value
    return method.strip(), params


def make_windows(tokenizer, ctx: int, decode: int, offsets=OFFSETS) -> list[Window]:
    ids = torch.tensor(tokenizer(prose_text(), add_special_tokens=False)["input_ids"])
    span = ctx + decode + 1
    out = []
    for f in offsets:
        start = int(f * (len(ids) - span))
        chunk = ids[start:start + span].unsqueeze(0)
        out.append(Window(chunk[:, :ctx], chunk[:, ctx:]))
    return out


@torch.inference_mode()
def decode_logprobs(model, window: Window, cache) -> torch.Tensor:
    """Log-probabilities (decode, vocab) of the next token at each decoded position, through `cache`."""
    model(window.prompt, past_key_values=cache, use_cache=True)  # its own prediction reads no stored token
    steps = []
    for i in range(window.targets.shape[1] - 1):
        out = model(window.targets[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.log_softmax(torch.cat(steps, 0).float(), -1)


def score(ref: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> dict:
    """ref, logp (N, V) log-probs; targets (N,) true next tokens."""
    kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
    nll = -logp.gather(-1, targets.unsqueeze(-1)).mean().item()
    top1 = (ref.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return {"kl": kl, "nll": nll, "top1": top1}


def evaluate(model, windows: list[Window], configs: list[str], log=None) -> list[dict]:
    refs = [decode_logprobs(model, w, smartkv.make_cache("fp16", model)) for w in windows]
    rows = []
    # the reference itself (an fp16 cache: ratio 1, KL 0, agreement 1 by definition)
    nll = sum(score(r, r, w.targets[0, 1:])["nll"] for w, r in zip(windows, refs)) / len(refs)
    rows.append({"config": "fp16 (reference)", "total_ratio": 1.0, "avg_bits": 16.0, "kl": 0.0, "nll": nll,
                 "ppl": math.exp(nll), "top1": 1.0, "seconds": 0.0})
    for spec in configs:
        method, params = parse_config(spec)
        t0 = time.perf_counter()
        per = []
        for w, ref in zip(windows, refs):
            cache = smartkv.make_cache(method, model, **params)
            logp = decode_logprobs(model, w, cache)
            s = score(ref, logp, w.targets[0, 1:])
            s["total_ratio"] = cache.memory_report().total_ratio
            s["avg_bits"] = cache.memory_report().avg_bits
            per.append(s)
        row = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
        row["ppl"] = math.exp(row["nll"])
        row["config"] = spec
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if log:
            log(row)
    return rows


def markdown(rows: list[dict]) -> str:
    fp = next((r for r in rows if r["config"].startswith("fp16")), None)
    lines = ["| config | total_ratio | avg_bits | KL(fp16‖m) | ppl | Δppl | top-1 agree |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        dppl = f"{100 * (r['ppl'] / fp['ppl'] - 1):+.2f}%" if fp else ""
        lines.append(f"| `{r['config']}` | {r['total_ratio']:.4f} | {r['avg_bits']:.2f} | {r['kl']:.5f} | "
                     f"{r['ppl']:.3f} | {dppl} | {100 * r['top1']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, default=1536, help="prefill tokens per window")
    p.add_argument("--decode", type=int, default=128, help="tokens fed one at a time after the prefill")
    p.add_argument("--windows", type=int, default=3, help="windows (fixed offsets 0.1, 0.4, 0.7 of the text)")
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                   help="';'-separated method[:k=v,...] specs, e.g. 'int4;smartkv:budget=4'")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from smartkv.models import load_model
    handle = load_model("smollm2")
    windows = make_windows(handle.tokenizer, a.ctx, a.decode, OFFSETS[:a.windows])
    configs = [c for c in a.configs.split(";") if c.strip()]
    log = lambda r: print(f"# {r['config']}: ratio {r['total_ratio']:.4f} KL {r['kl']:.5f} ppl {r['ppl']:.3f} "
                          f"top1 {100 * r['top1']:.1f}% ({r['seconds']:.0f}s)", file=sys.stderr, flush=True)

    rows = evaluate(handle.model, windows, configs, log)
    print(f"ctx {a.ctx}, decode {a.decode}, windows {len(windows)}, torch {torch.__version__}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
