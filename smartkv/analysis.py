"""Attention analysis on real prose: how concentrated attention is, how stable importance ranks are while
decoding, and the bits SmartKV allocates (layers x positions).

    python -m smartkv.analysis --out docs/img      # prints a summary table, writes two PNGs
    python -m smartkv.analysis --model gemma3 --out /tmp/gemma3

Any layout of KV heads (grouped queries, one KV head) and hybrid models: a sliding-window layer (Gemma 3) attends
to its window only, so its statistics are over the prompt tokens inside the window (mass elsewhere is 0: its
entropy stays below log2 of the window, not of the context), and its bits cover the middle it still holds (NaN
before it).

`analyze_attention(model, tokenizer, ...)` returns the numbers; `plot_analysis(result, out_dir)` draws them.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartkv.cache.hf_compat import cache_kwargs

log = logging.getLogger(__name__)


@dataclass
class AttentionAnalysis:
    """Per (layer, query head) over the decoded queries; `bits_k`/`bits_v` (layers, positions), mean over heads."""
    entropy_bits: torch.Tensor         # (L, Hq) mean entropy of a decode query's attention, in bits
    uniform_entropy_bits: float        # log2(context length): the entropy of flat attention
    top1_share: torch.Tensor           # (L, Hq) mean share of attention mass on the top 1% of tokens
    top10_share: torch.Tensor          # (L, Hq) ... top 10%
    rank_stability: torch.Tensor       # (L, Hq) overlap of the top-10% token sets of the first and last quarter
    sink_share: torch.Tensor           # (L, Hq) mass on the first 4 tokens
    bits_k: torch.Tensor               # (L, T_middle), right-aligned: NaN where a sliding layer forgot the token
    bits_v: torch.Tensor
    windows: list = field(default_factory=list)   # per layer: its sliding window, None for full attention
    smartkv_params: dict = field(default_factory=dict)


def _top_share(p: torch.Tensor, frac: float) -> torch.Tensor:
    k = max(1, int(round(frac * p.shape[-1])))
    return p.topk(k, dim=-1).values.sum(-1)


@torch.inference_mode()
def analyze_attention(model, tokenizer, ctx: int = 1024, decode: int = 64, offset: float = 0.4,
                      smartkv_params: dict | None = None) -> AttentionAnalysis:
    """Prefill `ctx` tokens of CPython's documentation prose, decode `decode` more (teacher forced) with an fp16
    cache reading eager attention weights, then replay the same tokens through a SmartKV cache for its bits."""
    import smartkv
    from smartkv.data.prose import prose_text
    from smartkv.cache.hf_compat import attn_implementation, use_attention

    ids = torch.tensor(tokenizer(prose_text(), add_special_tokens=False)["input_ids"])
    start = int(offset * (len(ids) - ctx - decode))
    ids = ids[start:start + ctx + decode].unsqueeze(0)

    params = dict(smartkv_params or {})
    cache = smartkv.make_cache("smartkv", model, **params)
    model(ids[:, :ctx], **cache_kwargs(model, cache), use_cache=True)
    for t in range(ctx, ctx + decode):
        model(ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True)
    bits_k, bits_v = (_right_aligned([layer.level_bits(kind)[0].float().mean(0) for layer in cache.layers])
                      for kind in "kv")   # (L, Tq): the middle ends at the same position on every layer
    windows = [layer.sliding_window for layer in cache.layers]

    previous = attn_implementation(model)
    use_attention(model, "eager")
    try:
        ref = smartkv.make_cache("fp16", model)
        use_attention(model, "eager")  # make_cache switched it back to the smartkv hook
        model(ids[:, :ctx], **cache_kwargs(model, ref), use_cache=True)
        steps = []
        for t in range(ctx, ctx + decode):
            out = model(ids[:, t:t + 1], **cache_kwargs(model, ref), use_cache=True, output_attentions=True)
            # L x (Hq, ctx): the prompt tokens; a sliding layer's keys are the last positions up to t only
            steps.append([_at_positions(a[0, :, 0].float(), t + 1)[:, :ctx] for a in out.attentions])
    finally:
        use_attention(model, previous)
    probs = torch.stack([torch.stack(s) for s in steps])  # (decode, L, Hq, ctx)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    ent = -(probs * probs.clamp_min(1e-30).log2()).sum(-1).mean(0)
    q = max(1, decode // 4)
    k = max(1, ctx // 10)
    first = probs[:q].mean(0).topk(k, -1).indices
    last = probs[-q:].mean(0).topk(k, -1).indices
    hit = torch.zeros(*first.shape[:-1], ctx, dtype=torch.bool).scatter_(-1, first, True)
    overlap = hit.gather(-1, last).float().mean(-1)
    return AttentionAnalysis(
        entropy_bits=ent, uniform_entropy_bits=float(torch.log2(torch.tensor(float(ctx)))),
        top1_share=_top_share(probs, 0.01).mean(0), top10_share=_top_share(probs, 0.10).mean(0),
        rank_stability=overlap, sink_share=probs[..., :4].sum(-1).mean(0),
        bits_k=bits_k, bits_v=bits_v, windows=windows, smartkv_params=cache.method_config.params())


def _at_positions(weights: torch.Tensor, length: int) -> torch.Tensor:
    """(H, kv) attention over the last kv of `length` positions -> (H, length), 0 before them."""
    return torch.nn.functional.pad(weights, (length - weights.shape[-1], 0))


def _right_aligned(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of different lengths ending at the same position -> (len(rows), longest), NaN-padded on the left."""
    width = max((r.shape[-1] for r in rows), default=0)
    return torch.stack([torch.nn.functional.pad(r, (width - r.shape[-1], 0), value=float("nan")) for r in rows])


def plot_analysis(res: AttentionAnalysis, out_dir: str | Path) -> list[Path]:
    """Two PNGs: attention statistics per layer x head, and SmartKV's bits per layer x position."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [("entropy (bits), flat = %.1f" % res.uniform_entropy_bits, res.entropy_bits, "viridis"),
              ("mass on top 1% of tokens", res.top1_share, "magma"),
              ("mass on top 10% of tokens", res.top10_share, "magma"),
              ("mass on the first 4 tokens (sinks)", res.sink_share, "magma"),
              ("top-10% overlap, first vs last quarter of decoding", res.rank_stability, "cividis")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 5), constrained_layout=True)
    for ax, (title, data, cmap) in zip(axes, panels):
        im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    p1 = out_dir / "attention_stats.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(12, 7), constrained_layout=True)
    for ax, data, what in ((axes[0], res.bits_k, "keys"), (axes[1], res.bits_v, "values")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap="plasma", interpolation="nearest", vmin=2, vmax=8)
        ax.set_title(f"SmartKV bits for {what} (mean over KV heads), budget {res.smartkv_params.get('budget')}")
        ax.set_xlabel("position in the quantized middle (after the sinks)")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    p2 = out_dir / "smartkv_bits.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def summary_table(res: AttentionAnalysis) -> str:
    """Markdown: per layer, mean over heads of each statistic, and the mean key/value bits."""
    lines = ["| layer | entropy (bits) | top 1% | top 10% | sinks | top-10% overlap | key bits | value bits |",
             "|---|---|---|---|---|---|---|---|"]
    for i in range(res.entropy_bits.shape[0]):
        lines.append(f"| {i} | {res.entropy_bits[i].mean():.2f} | {res.top1_share[i].mean():.2f} | "
                     f"{res.top10_share[i].mean():.2f} | {res.sink_share[i].mean():.2f} | "
                     f"{res.rank_stability[i].mean():.2f} | {res.bits_k[i].nanmean():.2f} | {res.bits_v[i].nanmean():.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--budget", type=float, default=4.25)
    p.add_argument("--out", default="docs/img")
    p.add_argument("--model", default="smollm2", help="model name for smartkv.models.load_model")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from smartkv.models import load_model
    h = load_model(a.model)
    res = analyze_attention(h.model, h.tokenizer, a.ctx, a.decode, smartkv_params={"budget": a.budget,
                                                                                     "key_value_gap": 3})
    for path in plot_analysis(res, a.out):
        print(f"wrote {path}")
    print(summary_table(res))


if __name__ == "__main__":
    main()
