"""The quality frontier on the embedded model (CPU): quality against total memory ratio (everything counted).

    python benchmarks/frontier.py                                  # quality (bench_quality) + retrieval + plot
    python benchmarks/frontier.py --retrieval-samples 0            # prose KL/ppl only

Writes results/frontier.json (rows: config, total_ratio, kl, ppl, top1, and retrieval accuracy per task and
length), prints a markdown table and draws docs/img/frontier.png (KL vs total_ratio, log-log).
Retrieval: retrieval.py's greedy answers through the cache on smartkv.data prompt sets (passkey, kv-retrieval),
scored with their own metric; few samples on CPU, so each accuracy is a coarse estimate (n given in the table header).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_quality  # noqa: E402
import retrieval  # noqa: E402

BASELINES = ("int8", "int4", "kivi:key_bits=4,value_bits=4,residual_length=32",
             "kivi:key_bits=2,value_bits=4,residual_length=32", "kivi:key_bits=2,value_bits=4,residual_length=128",
             "kivi:key_bits=2,value_bits=2,residual_length=32", "kivi:key_bits=2,value_bits=2,residual_length=128")


def retrieval_accuracy(model, tokenizer, spec: str, task: str, length: int, samples: int, seed: int = 42) -> float:
    """Share of `samples` answered through `spec`'s cache: retrieval.py's greedy answers (stopped at
    end-of-sequence, graphed where the cache allows), so both benchmarks score the same way."""
    rows = retrieval.run_unit(model, tokenizer, spec, task, length, samples, seed)
    return sum(r["score"] for r in rows) / len(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    families = {"smartkv": ("o", "C3"), "kivi": ("s", "C0"), "int4": ("^", "C2"), "int8": ("v", "C2")}
    for fam, (marker, color) in families.items():
        pts = sorted((r["total_ratio"], max(r["kl"], 1e-5), r["config"]) for r in rows
                     if r["config"].split(":")[0] == fam)
        if not pts:
            continue
        xs, ys, names = zip(*pts)
        ax.plot(xs, ys, marker, color=color, label=fam, linestyle="-" if fam == "smartkv" else "none")
        for x, y, n in pts:
            if fam == "kivi":
                p = bench_quality.parse_config(n)[1]
                ax.annotate(f"K{p.get('key_bits')}V{p.get('value_bits')} R{p.get('residual_length')}", (x, y),
                            fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total memory ratio vs fp16 (codes + scales + maps + windows)")
    ax.set_ylabel("KL(fp16 || method), decode path, mean over positions")
    ax.set_title("SmolLM2-135M, CPython prose: 1.5K prefill + 128 decoded tokens, 3 windows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict], tasks: list[str]) -> str:
    head = "| config | total_ratio | KL | ppl | top-1 |" + "".join(f" {t} |" for t in tasks)
    lines = [head, "|" + "---|" * (5 + len(tasks))]
    for r in sorted(rows, key=lambda r: r["total_ratio"]):
        acc = "".join(f" {100 * r[t]:.0f}% |" if t in r else " - |" for t in tasks)
        lines.append(f"| `{r['config']}` | {r['total_ratio']:.4f} | {r['kl']:.5f} | {r['ppl']:.3f} | "
                     f"{100 * r['top1']:.1f}% |{acc}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="results/frontier.json", help="rows are cached here; delete to recompute")
    p.add_argument("--plot", default="docs/img/frontier.png")
    p.add_argument("--retrieval-samples", type=int, default=3)
    p.add_argument("--lengths", default="2048", help="comma-separated retrieval prompt lengths, e.g. 2048,4096")
    p.add_argument("--tasks", default="passkey,kv-retrieval")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from smartkv.models import load_model
    h = load_model("smollm2")
    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.is_file() else []
    done = {r["config"] for r in rows}
    configs = [c for c in BASELINES + bench_quality.DEFAULT_CONFIGS[2:] if c not in done]
    if configs:
        windows = bench_quality.make_windows(h.tokenizer, 1536, 128)
        rows += [r for r in bench_quality.evaluate(h.model, windows, list(dict.fromkeys(configs)))
                 if not r["config"].startswith("fp16")]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
    tasks = [f"{t}@{n}" for n in a.lengths.split(",") for t in a.tasks.split(",")] if a.retrieval_samples else []
    for r in rows:
        for t in tasks:
            if t not in r:
                name, n = t.split("@")
                r[t] = retrieval_accuracy(h.model, h.tokenizer, r["config"], name, int(n), a.retrieval_samples)
                print(f"# {r['config']} {t}: {r[t]:.2f}", file=sys.stderr, flush=True)
                path.write_text(json.dumps(rows, indent=1))
    plot(rows, Path(a.plot))
    print(table(rows, tasks))


if __name__ == "__main__":
    main()
