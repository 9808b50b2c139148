"""Retrieval accuracy of KV-cache methods on the synthetic long-context tasks, with intervals (GPU or CPU).

Per (task, length) cell the same `--samples` prompts go through every config: the prompt is prefilled into the
method's cache and the answer generated greedily through it (`smartkv.cache.graphs.generate_greedy`: CUDA-graph
steps where the cache supports them, ordinary steps otherwise; the task's own `max_new_tokens`, stopped at the
first end-of-sequence token or once the answer holds every reference, which no later token can change), then
scored with the task's metric. Reported per cell and config: accuracy with a 95%
bootstrap interval over samples, n, and the paired difference to `--reference` on the same samples with its
interval; total_ratio is memory_report().total_ratio after the answer.

    python benchmarks/retrieval.py --model smollm2 --samples 50 --json out.json           # every config, one process
    python benchmarks/retrieval.py ... --shard 3/8 --json part3.json                      # one eighth of the work
    python benchmarks/retrieval.py --from-json 'part*.json' --reference int4

Work comes in units of (config, task, length, a chunk of --chunk samples), longest prompts and SmartKV first.
Several processes share one GPU (the eager steps are launch-bound) either by `--shard I/N` (every N-th unit) or,
balanced, by `--claim-dir DIR`: each process takes the next unit nobody has claimed (an exclusive file create), so a
slow unit holds up one process, not a fixed share. A unit that raises is reported and skipped; `--from-json` merges
the processes' rows and prints the tables; with `--merge-into ROWS.json.gz` it first adds them to a kept row file.

    python benchmarks/retrieval.py --claim-dir /tmp/claims --json part$I.json      # in each of N processes

`--skip-done GLOB` goes on from earlier rows; with `--floor X` it also skips the other configs' units of the cells
where fp16 scored below X there (the model cannot do the task at that length, so no cache can be told apart).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import parse_config, parse_shard  # noqa: E402

TASKS = ("passkey", "needle", "kv-retrieval", "variable-tracking")
# The two memory points of the frontier (int4's total bytes and KIVI-2's), each with its contenders
INT4_POINT = ("int4", "kivi:key_bits=4,value_bits=4,residual_length=32",
              "zipcache:high_bits=8,low_bits=4,salient_ratio=0.15",
              "smartkv:budget=4.25,key_value_gap=3,importance_floor=1")
KIVI2_POINT = ("kivi:key_bits=2,value_bits=2,residual_length=32", "zipcache:salient_ratio=0.4",
               "smartkv:budget=2.4,key_value_gap=1,group_size=64,recent_window=8,realloc_every=8,importance_power=1")
CONFIGS = ("fp16", *INT4_POINT, *KIVI2_POINT)


def stop_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence id(s)."""
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def answer_text(tokenizer, new_ids: list[int]) -> str:
    """The generated text up to (not including) the first end-of-sequence token."""
    stops = stop_ids(tokenizer)
    cut = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:cut], skip_special_tokens=True)


def run_unit(model, tokenizer, spec: str, task: str, length: int, samples: int, seed: int,
             chunk: tuple[int, int] | None = None, mode: str | None = None) -> list[dict]:
    """One row per sample of one (config, task, length) unit: samples [lo, hi) of the `samples` the seed draws
    (all of them without `chunk`), numbered as in the whole set so that chunks pair across configs."""
    return list(unit_rows(model, tokenizer, spec, task, length, samples, seed, chunk, mode))


@torch.inference_mode()
def unit_rows(model, tokenizer, spec: str, task: str, length: int, samples: int, seed: int,
              chunk: tuple[int, int] | None = None, mode: str | None = None, skip: frozenset = frozenset()):
    """`run_unit`'s rows one sample at a time (a caller can keep each as it comes), leaving out the sample numbers
    in `skip` (those an earlier run answered)."""
    import smartkv
    from smartkv.cache.graphs import generate_greedy
    from smartkv.data.base import get_prompt_set
    from smartkv.data.inputs import build_input_ids
    from smartkv.metrics.task import saturated, score

    method, params = parse_config(spec)
    device = next(model.parameters()).device
    lo, hi = chunk or (0, samples)
    stops = stop_ids(tokenizer) or None
    prompts = get_prompt_set(task, length=length, num_samples=samples, seed=seed).sample_range(tokenizer, lo, hi)
    for i, s in enumerate(prompts, start=lo):
        if i in skip:
            continue
        ids = torch.tensor([build_input_ids(s, tokenizer)], device=device)
        cache = smartkv.make_cache(method, model, **params)
        t0 = time.perf_counter()
        done = lambda toks, s=s: saturated(s.metric, answer_text(tokenizer, toks[0].tolist()), s.answers)  # noqa: E731
        new = generate_greedy(model, cache, ids, s.max_new_tokens, mode=mode, stop_ids=stops, until=done)[0].tolist()
        seconds = time.perf_counter() - t0
        text = answer_text(tokenizer, new)
        yield {"config": spec, "task": task, "length": length, "sample": i, "prompt_tokens": ids.shape[1],
               "score": score(s.metric, text, s.answers, s.all_classes), "answer": text[:80], "new_tokens": len(new),
               "total_ratio": cache.memory_report().total_ratio, "seconds": seconds, "mode": mode or "auto"}


def unfit_cells(tokenizer, tasks: list[str], lengths: list[int], samples: int, seed: int) -> dict[tuple, str]:
    """(task, length) cells whose prompts cannot be built at that length with this tokenizer (the task's prompt
    without any haystack is longer), with the reason: found before any generation, so a sweep whose shortest
    length is too short for one task skips that cell once instead of failing every config's units there."""
    from smartkv.data.base import get_prompt_set

    unfit = {}
    for task in tasks:
        for length in lengths:
            try:
                get_prompt_set(task, length=length, num_samples=samples, seed=seed).check_tokenizer(tokenizer)
            except ValueError as e:
                unfit[(task, length)] = str(e)
    return unfit


def merge_rows(path: str, rows: list[dict]) -> tuple[list[dict], int, int]:
    """Add `rows` to the row file `path` (created if absent) without duplicates: a sample already there keeps its
    row. Returns (the file's rows now, rows added, duplicates whose score differs from the kept row's)."""
    held = read_rows(path) if Path(path).exists() else []
    models = sorted({r["model"] for r in held + rows})
    if len(models) > 1:
        raise ValueError(f"{path} would hold rows of {len(models)} models {models}; keep one file a model")
    seen = {sample_key(r): r for r in held}   # one model, so a sample's key needs no model
    added, differ = [], 0
    for r in rows:
        k = sample_key(r)
        if k in seen:
            differ += seen[k]["score"] != r["score"]
        else:
            seen[k] = r
            added.append(r)
    write_rows(path, held + added)
    return held + added, len(added), differ


def work_units(configs: list[str], tasks: list[str], lengths: list[int], samples: int, chunk: int) -> list[tuple]:
    """(config, task, length, (lo, hi)) units, the costliest first (longest prompt, then SmartKV, whose prefill is
    the slowest), so that the last units to finish are short ones."""
    units = [(c, t, n, (lo, min(lo + chunk, samples)))
             for c in configs for t in tasks for n in lengths for lo in range(0, samples, chunk)]
    return sorted(units, key=lambda u: (-u[2], not u[0].startswith("smartkv")))


def write_rows(path: str, rows: list[dict]) -> None:
    """`rows` to `path` (gzip when it ends in .gz, without a timestamp: the same rows, the same bytes), whole or not
    at all: written to a temporary file and renamed, so a kill mid-write leaves the previous file."""
    data = json.dumps(rows).encode()
    tmp = Path(path + ".part")
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.endswith(".gz") else data)
    os.replace(tmp, path)


def read_rows(pattern: str, model: str | None = None) -> list[dict]:
    """The rows of every file matching `pattern` (JSON lists; .json.gz too); with `model`, only that model's rows.
    ValueError naming the file when a row lacks its model (rows of two models must never pass for one)."""
    rows = []
    for f in sorted(glob.glob(pattern)):
        text = gzip.decompress(Path(f).read_bytes()).decode() if f.endswith(".gz") else Path(f).read_text()
        got = json.loads(text)
        if any("model" not in r for r in got):
            raise ValueError(f"{f}: rows lack 'model' (which model answered them); add it before merging")
        rows.extend(r for r in got if model is None or r["model"] == model)
    return rows


def done_units(units: list[tuple], rows: list[dict]) -> set[tuple]:
    """The units every sample of which is among `rows` already (a run that goes on from an earlier one)."""
    have = answered(rows)
    return {u for u in units if all((u[0], u[1], u[2], i) in have for i in range(*u[3]))}


def floor_cells(rows: list[dict], reference: str, samples: int, floor: float) -> set[tuple]:
    """(task, length) cells where `reference` (the full-precision cache) scored below `floor` on at least `samples`
    samples: there no cache method can be told apart from another (every one is at the model's floor)."""
    per = defaultdict(list)
    for r in rows:
        if r["config"] == reference:
            per[(r["task"], r["length"])].append(r["score"])
    return {cell for cell, s in per.items() if len(s) >= samples and sum(s) / len(s) < floor}


def claim(directory: Path, unit: tuple) -> bool:
    """True for exactly one of the processes that ask for `unit` (an exclusive create of a file named after it)."""
    name = hashlib.sha1(json.dumps(unit).encode()).hexdigest()[:16]
    try:
        os.close(os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def cell_tables(rows: list[dict], reference: str | None) -> list[dict]:
    """Per (task, length, config): n, accuracy [95% CI], and the paired difference to `reference` [95% CI]."""
    from smartkv.bench.results.stats import bootstrap_ci

    by = defaultdict(dict)
    for r in rows:
        by[(r["task"], r["length"], r["config"])][r["sample"]] = r
    out = []
    for (task, length, config), per in sorted(by.items()):
        scores = [per[k]["score"] for k in sorted(per)]
        ratio = sum(r["total_ratio"] for r in per.values()) / len(per)
        cell = {"task": task, "length": length, "config": config, "n": len(scores),
                "accuracy": sum(scores) / len(scores), "total_ratio": ratio}
        cell["lo"], cell["hi"] = bootstrap_ci(scores)
        ref = by.get((task, length, reference))
        if ref is not None and config != reference:
            common = sorted(set(per) & set(ref))
            diff = [per[k]["score"] - ref[k]["score"] for k in common]
            if diff:
                cell["diff"], cell["diff_n"] = sum(diff) / len(diff), len(diff)
                cell["diff_lo"], cell["diff_hi"] = bootstrap_ci(diff)
        out.append(cell)
    return out


def wide_rows(cells: list[dict]) -> tuple[list[str], list[list]]:
    """One row per config (CONFIGS' order, then first seen), one column per (task, length): "accuracy [lo, hi]", with "(n=N)"
    where a cell has fewer samples than the most any cell has; the configs' mean total_ratio second."""
    columns = sorted({(c["task"], c["length"]) for c in cells}, key=lambda k: (TASKS.index(k[0]) if k[0] in TASKS
                                                                              else len(TASKS), k[0], k[1]))
    full = max(c["n"] for c in cells)
    by = {(c["config"], c["task"], c["length"]): c for c in cells}
    seen = list(dict.fromkeys(c["config"] for c in cells))
    configs = sorted(seen, key=lambda c: (CONFIGS.index(c) if c in CONFIGS else len(CONFIGS), seen.index(c)))
    rows = []
    for config in configs:
        mine = [c for c in cells if c["config"] == config]
        row = [config, round(sum(c["total_ratio"] for c in mine) / len(mine), 3)]
        for task, length in columns:
            c = by.get((config, task, length))
            row.append(None if c is None else f"{c['accuracy']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"
                       + (f" (n={c['n']})" if c["n"] < full else ""))
        rows.append(row)
    return ["config", "total ratio"] + [f"{t} {n}" for t, n in columns], rows


def markdown(cells: list[dict], reference: str | None) -> str:
    lines = [f"| task | length | config | total_ratio | n | accuracy [95% CI] | vs `{reference}` [95% CI] (pairs) |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        diff = (f"{c['diff']:+.2f} [{c['diff_lo']:+.2f}, {c['diff_hi']:+.2f}] ({c['diff_n']})"
                if "diff" in c else "")
        lines.append(f"| {c['task']} | {c['length']} | `{c['config']}` | {c['total_ratio']:.3f} | {c['n']} | "
                     f"{c['accuracy']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}] | {diff} |")
    return "\n".join(lines)


def sample_key(row: dict) -> tuple:
    """(config, task, length, sample): which sample of which cell a row answers."""
    return row["config"], row["task"], row["length"], row["sample"]


def answered(rows: list[dict]) -> set[tuple]:
    """`sample_key` of every row."""
    return {sample_key(r) for r in rows}


def pending_units(units: list[tuple], a, earlier: list[dict] | None = None) -> list[tuple]:
    """`units` less those the --skip-done rows (`earlier`) hold in full and, with --floor, those of cells at the
    model's floor."""
    if not a.skip_done:
        return units
    for g in a.skip_done:
        if not glob.glob(g):   # a mistyped glob would silently rerun every unit it was meant to skip
            print(f"--skip-done: no file matches {g!r}", file=sys.stderr, flush=True)
    earlier = [r for g in a.skip_done for r in read_rows(g, a.model)] if earlier is None else earlier
    done = done_units(units, earlier)
    units = [u for u in units if u not in done]
    print(f"--skip-done: {len(done)} units held already, {len(units)} to run", flush=True)
    if a.floor is not None:
        reference = a.reference or "fp16"
        low = floor_cells(earlier, reference, a.samples, a.floor)
        units = [u for u in units if u[0] == reference or (u[1], u[2]) not in low]
        print(f"--floor {a.floor}: {reference} below it at {sorted(low)}; {len(units)} units to run", flush=True)
    return units


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name for smartkv.models.load_model")
    p.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated method specs")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="2048,4096,8000", help="comma-separated prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--chunk", type=int, default=10, help="samples a work unit")
    p.add_argument("--mode", default=None, choices=["graph", "static", "eager"],
                   help="generate_greedy's steps (default: graphed where the cache allows on CUDA, else eager)")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th work unit from the I-th")
    p.add_argument("--claim-dir", default=None, help="shared folder: take the next unclaimed unit (no --shard)")
    p.add_argument("--json", default=None, help="write the per-sample rows here")
    p.add_argument("--from-json", default=None, help="glob of row files to merge and print (no run)")
    p.add_argument("--merge-into", default=None,
                   help="with --from-json: add those rows to this row file (no duplicates), then print its tables")
    p.add_argument("--skip-done", action="append", default=[],
                   help="glob of row files: skip the units they hold in full (repeatable)")
    p.add_argument("--floor", type=float, default=None,
                   help="with --skip-done: skip other configs' units of cells where the reference config (fp16 "
                        "unless --reference) scored below this on --samples samples in those rows")
    p.add_argument("--reference", default=None, help="config for the paired difference column")
    p.add_argument("--wide", action="store_true", help="with --from-json: one row per config, a column per cell")
    return p


def main(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if not 1 <= a.samples <= 10_000:
        p.error(f"--samples must be in [1, 10000], got {a.samples}")
    if a.chunk < 1:
        p.error(f"--chunk must be at least 1, got {a.chunk}")
    if a.floor is not None and not a.skip_done:
        p.error("--floor reads the reference's scores from the --skip-done rows; give --skip-done too")
    if a.merge_into and not a.from_json:
        p.error("--merge-into adds the rows of --from-json; give --from-json too")
    if a.claim_dir and a.shard != "0/1":
        p.error("--claim-dir and --shard split the work two ways; give one")
    if a.from_json:
        try:
            rows = read_rows(a.from_json)
        except ValueError as e:
            p.error(f"--from-json: {e}")
        if not rows:
            p.error(f"--from-json: no rows in files matching {a.from_json!r}")
        models = sorted({r["model"] for r in rows})
        if len(models) > 1:
            p.error(f"--from-json: rows of {len(models)} models {models}; merge one model's files at a time")
        if a.merge_into:
            try:
                merged, added, differ = merge_rows(a.merge_into, rows)
            except ValueError as e:
                p.error(f"--merge-into: {e}")
            print(f"{a.merge_into}: {added} rows added, {len(rows) - added} already held"
                  + (f" ({differ} of those with another score: the held row kept)" if differ else ""))
            rows = merged
        cells = cell_tables(rows, a.reference)
        if a.wide:
            columns, table = wide_rows(cells)
            print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
            print("\n".join("| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in table))
        else:
            print(markdown(cells, a.reference))
        return
    tasks, lengths = a.tasks.split(","), [int(x) for x in a.lengths.split(",")]
    configs = [c.strip() for c in a.configs.split(";") if c.strip()]
    import smartkv
    for c in configs:  # every spec built once before any model loads: a typo is one line, not a lost run
        method, params = parse_config(c)
        smartkv.make_config(method, **params)
    try:
        earlier = [r for g in a.skip_done for r in read_rows(g, a.model)]
    except ValueError as e:
        p.error(f"--skip-done: {e}")
    have = answered(earlier)   # a unit an earlier run stopped inside runs only the samples it lacks
    units = pending_units(work_units(configs, tasks, lengths, a.samples, a.chunk), a, earlier)
    shard, shards = parse_shard(p, a.shard)
    claims = Path(a.claim_dir) if a.claim_dir else None
    if claims:
        claims.mkdir(parents=True, exist_ok=True)
    from smartkv.models import load_model
    handle = load_model(a.model)
    unfit = unfit_cells(handle.tokenizer, tasks, lengths, a.samples, a.seed)
    for (task, length), why in unfit.items():
        print(f"skipping {task} at {length} tokens: {why}", flush=True)
    units = [u for u in units if (u[1], u[2]) not in unfit]
    rows = []
    for spec, task, length, chunk in units if claims else units[shard::shards]:
        if claims and not claim(claims, (spec, task, length, chunk)):
            continue
        t0, got = time.perf_counter(), []
        skip = frozenset(i for i in range(*chunk) if (spec, task, length, i) in have)
        try:
            for row in unit_rows(handle.model, handle.tokenizer, spec, task, length, a.samples, a.seed, chunk,
                                 a.mode, skip):
                row = {"model": a.model, **row}   # --skip-done and --from-json keep one model's rows apart
                got.append(row)
                rows.append(row)
                if a.json:  # after every sample, so a run stopped by its time limit keeps what it answered
                    write_rows(a.json, rows)
        except Exception:  # one config's fault costs its units, not the process's remaining work
            print(f"FAILED {task} {length} {spec} samples {chunk}:\n{traceback.format_exc()}", flush=True)
            continue
        acc = sum(r["score"] for r in got) / max(len(got), 1)
        print(f"{task} {length} {spec} {chunk}: {acc:.2f} over {len(got)} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    if not a.json:
        print(markdown(cell_tables(rows, a.reference), a.reference))


if __name__ == "__main__":
    main()
