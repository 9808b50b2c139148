"""The original validation experiment, runnable as the original README says (see README.md here):

    python -m smartkv.experiments.validate_baselines --model gpt2 --num-prompts 3
    python -m smartkv.experiments.validate_baselines --memory-only
    python -m smartkv.experiments.validate_baselines --baselines FP16 INT8 INT4 --device cpu

Every baseline generates THROUGH its own cache. Prints a coloured table, appends to <out-dir>/validation.log and
writes every number to <out-dir>/<experiment_id>.json. Bad input: one line on stderr, exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import platform
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from smartkv.experiments import baselines as V

log = logging.getLogger("smartkv.experiments.validate_baselines")

DEFAULT_OUT_DIR = Path("experiments") / "validation"
# The original README's "Expected Results" (payload-only ratios), shown next to what is measured.
ORIGINAL_PAYLOAD = {"FP16": "1.00", "INT8": "0.50", "INT4": "0.25", "KIVI": "0.188", "SmartKV": "0.40-0.60"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong, what is allowed) and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _int_in(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi], else one line naming the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            what = "a positive integer" if lo == 1 else "an integer"
            raise argparse.ArgumentTypeError(f"must be {what} in [{lo}, {hi}], got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


MAX_SYNTHETIC_BYTES = 4 * 2**30   # --memory-only's fp16 K/V tensors
HUB_CONTEXT = {"gpt2": 1024, "gpt2-medium": 1024}


def _checked(fn):
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = fn.__name__
    return parse


def _device(text: str) -> str:
    from smartkv.models import resolve_device
    return resolve_device(text)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m smartkv.experiments.validate_baselines",
                      description="Validate the baselines (FP16, INT8, INT4, KIVI, SmartKV) by generating through "
                                  "each one's KV cache; or, with --memory-only, measure the caches on tensors.")
    p.add_argument("--model", type=_checked(V.check_model_name), default="gpt2",
                   help=f"one of {', '.join(V.MODEL_NAMES)} or a local model directory; a hub model that cannot be "
                        f"loaded offline falls back to the embedded {V.FALLBACK_MODEL} (default: gpt2)")
    p.add_argument("--num-prompts", type=_int_in(1, 1000), default=3, help="prompts to generate from (default: 3)")
    p.add_argument("--baselines", type=_checked(V.baseline_name), nargs="+", default=list(V.BASELINES),
                   metavar="NAME", help=f"any of {', '.join(V.BASELINES)}, any case (default: all)")
    p.add_argument("--device", type=_checked(_device), default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--memory-only", action="store_true",
                   help="no model weights: measure the caches on synthetic K/V of the model's shape")
    p.add_argument("--context-tokens", type=_int_in(1, 1 << 20), default=None,
                   help="prompt prose tokens (default: 384), or with --memory-only the cached tokens (default: 1024)")
    p.add_argument("--max-new-tokens", type=_int_in(1, 4096), default=32, help="tokens to generate (default: 32)")
    p.add_argument("--seed", type=_int_in(0, 2**31 - 1), default=0, help="seed of the synthetic tensors (default: 0)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help=f"where validation.log and <experiment_id>.json go (default: {DEFAULT_OUT_DIR})")
    return p


def experiment_id(args: argparse.Namespace) -> str:
    spec = json.dumps({k: str(v) for k, v in sorted(vars(args).items())}, sort_keys=True)
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


# --- the two modes ---------------------------------------------------------------------------------------------

def run_memory_only(args, record: dict) -> list[dict]:
    shape = V.model_shape(args.model)
    tokens = args.context_tokens or 1024
    record["model"] = {"requested": args.model, "shape": shape, "weights_loaded": False}
    log.info("memory only: synthetic fp16 K/V of %s's shape %s at %d tokens", args.model, shape, tokens)
    rows = [V.measure_tensors(b, shape, tokens, seed=args.seed) for b in args.baselines]
    record["results"] = rows
    return rows


def run_on_model(args, record: dict) -> list[dict]:
    handle, note = V.load_for_validation(args.model, args.device, args.dtype)
    if note:
        log.warning(note)
    from smartkv.models import model_kv_shape
    record["model"] = {"requested": args.model, "loaded": handle.name, "note": note,
                       "dtype": str(next(handle.model.parameters()).dtype), "device": str(handle.device),
                       "shape": model_kv_shape(handle.model), "load_s": handle.load_s}
    samples = V.validation_samples(handle.tokenizer, args.num_prompts, args.context_tokens or 384,
                                   args.max_new_tokens)
    record["prompts"] = [{"id": s.id, **s.meta} for s in samples]
    log.info("model %s on %s (%s): %d prompts, %d new tokens each", handle.name, handle.device,
             record["model"]["dtype"], len(samples), args.max_new_tokens)
    V.warm_up(handle)
    rows, record["results"] = [], {}
    for baseline in args.baselines:
        start = time.perf_counter()
        result = V.run_baseline(handle, baseline, samples, seed=args.seed)
        summary = {"baseline": baseline, "label": result.label, **result.summary(),
                   "wall_s": time.perf_counter() - start}
        rows.append(summary)
        record["results"][baseline] = {"summary": summary, "samples": result.samples}
        log.info("%s done in %.1f s (%d failed)", baseline, summary["wall_s"], summary["n_failed"])
    return rows


# --- output ------------------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def memory_table(rows: list[dict], title: str):
    from rich.table import Table
    t = Table(title=title)
    for col in ("baseline", "payload x", "original", "total x", "avg bits", "K rel err", "V rel err", "KV MiB"):
        t.add_column(col, justify="left" if col == "baseline" else "right")
    for r in rows:
        t.add_row(f"[bold]{r['baseline']}[/]", _fmt(r["payload_ratio"], ".4f"), ORIGINAL_PAYLOAD[r["baseline"]],
                  _fmt(r["total_ratio"], ".4f"), _fmt(r["avg_bits"], ".2f"), _fmt(r["key_rel_error"], ".4f"),
                  _fmt(r["value_rel_error"], ".4f"), _fmt(r["total_bytes"] / 2**20, ".2f"))
    return t


def model_table(rows: list[dict], title: str):
    from rich.table import Table
    t = Table(title=title)
    cols = ("baseline", "payload x", "total x", "K rel err", "V rel err", "token agree", "exact", "top-1 (TF)",
            "KL (TF)", "prefill ms", "decode ms/tok", "failed")
    for col in cols:
        t.add_column(col, justify="left" if col == "baseline" else "right")
    for r in rows:
        failed = f"[red]{r['n_failed']}[/]" if r["n_failed"] else "0"
        t.add_row(f"[bold]{r['baseline']}[/]", _fmt(r["payload_ratio"]), _fmt(r["total_ratio"]),
                  _fmt(r["key_rel_error"], ".4f"), _fmt(r["value_rel_error"], ".4f"), _fmt(r["token_agreement"]),
                  _fmt(r["exact_match_fp16"], ".2f"), _fmt(r["top1_agreement"]), _fmt(r["kl_to_fp16"], ".2e"),
                  _fmt(r["prefill_ms"], ".0f"), _fmt(r["decode_ms_per_token"], ".1f"), failed)
    return t


def plain(renderable) -> str:
    from rich.console import Console
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None, force_terminal=False).print(renderable)
    return buffer.getvalue()


def setup_logging(out_dir: Path, exp_id: str, console) -> list[logging.Handler]:
    from rich.logging import RichHandler
    file_handler = logging.FileHandler(out_dir / "validation.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{exp_id}] %(name)s: %(message)s"))
    handlers = [file_handler, RichHandler(console=console, show_path=False, markup=False)]
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in handlers:
        root.addHandler(h)
    return handlers


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What one argument alone cannot say: the sizes against the model, the output directory usable. Exits 2 with
    one line (parser.error) before any model loads or anything is written."""
    if args.memory_only:
        shape = V.model_shape(args.model)
        per_token = 2 * 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"]  # K and V, fp16
        tokens = args.context_tokens or 1024
        if tokens * per_token > MAX_SYNTHETIC_BYTES:
            parser.error(f"argument --context-tokens: {tokens} tokens of {args.model}'s keys and values are "
                         f"{tokens * per_token / 2**30:.1f} GiB; at most {MAX_SYNTHETIC_BYTES // per_token} tokens "
                         f"({MAX_SYNTHETIC_BYTES // 2**30} GiB)")
    else:
        from smartkv.models import model_context
        context = HUB_CONTEXT.get(args.model) or model_context(args.model)
        tokens = (args.context_tokens or 384) + args.max_new_tokens
        if context is not None and tokens > context:
            parser.error(f"argument --context-tokens: {args.context_tokens or 384} prompt tokens + "
                         f"{args.max_new_tokens} new tokens exceed {args.model}'s context of {context} tokens")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        probe = args.out_dir / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        parser.error(f"argument --out-dir: cannot write to {args.out_dir}: {exc.strerror or exc}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad input exits here with code 2, before anything is written
    check_args(parser, args)
    args.baselines = list(dict.fromkeys(args.baselines))
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # logs and pipes: keep the table's columns whole
        console = Console(width=160)
    exp_id = experiment_id(args)
    handlers = setup_logging(args.out_dir, exp_id, console)
    start = time.perf_counter()
    record = {"experiment_id": exp_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv if argv is None else argv, "args": {k: str(v) for k, v in vars(args).items()},
              "mode": "memory-only" if args.memory_only else "model", "host": platform.node(),
              "versions": _versions()}
    try:
        log.info("experiment %s: %s", exp_id, " ".join(record["argv"] if argv is not None else sys.argv[1:]))
        if args.memory_only:
            rows = run_memory_only(args, record)
            table = memory_table(rows, f"KV cache memory, {args.model} shape, {rows[0]['tokens']} tokens "
                                       f"(synthetic fp16 K/V)")
        else:
            rows = run_on_model(args, record)
            model = record["model"]
            table = model_table(rows, f"Baselines on {model['loaded']} ({model['device']}, {model['dtype']}), "
                                      f"{args.num_prompts} prompts x {args.max_new_tokens} new tokens")
            if "float32" in model["dtype"] and "FP16" in args.baselines:
                record["notes"] = ["FP16 stores keys/values in the model dtype (float32 here): its ratios are "
                                   "against a 16-bit cache; quantized baselines keep full-precision windows in "
                                   "16 bits"]
        record["wall_s"] = time.perf_counter() - start
        console.print(table)
        for note in record.get("notes", []):
            console.print(f"[dim]note: {note}[/]")
        path = args.out_dir / f"{exp_id}.json"
        path.write_text(V.to_json(record), encoding="utf-8")
        handlers[0].stream.write(plain(table))
        log.info("wall time %.1f s; results in %s", record["wall_s"], path)
        return 0
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def _versions() -> dict:
    import torch
    import transformers

    import smartkv
    return {"smartkv": smartkv.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
