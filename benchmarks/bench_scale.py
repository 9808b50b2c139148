"""Scaling: the same grid on 1, 2, 4 ... GPUs of one host, one actor per GPU (issue 8).

    python benchmarks/bench_scale.py --gpus 1,2,4                      # jobs/scale.yaml into results/scale-bench
    python benchmarks/bench_scale.py --gpus 1 && python benchmarks/bench_scale.py --gpus 2,4   # split over calls
    python benchmarks/bench_scale.py --table                           # only print the table of the runs found

Each run gets a fresh results directory and a child process whose CUDA_VISIBLE_DEVICES holds the first n GPUs (so
the local Ray it starts sees n); the child submits the grid through the same library calls as `smartkv-bench
submit`. Meanwhile this process samples each GPU's utilisation with nvidia-smi (share of time a kernel ran). The
embedded model's one-time conversion happens before the first run, outside the timing. Every run's numbers go to
<out>/run-<n>gpu.json; the table (<out>/scale.md) gathers all runs found there, speedups against the 1-GPU run.

Columns: wall = Ray start to the last result written; run = first job handed out to the last result; jobs/min over
run; loads = model loads (at most workers x models) and their summed seconds; start = workers started; writes =
driver time writing results; busy = workers' time inside jobs; tail = workers idle after their last job while others
ran (imbalance); GPU = mean kernel-active share over the run; slowest = the longest job.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(grid: str, out: Path, gpus: int, workers_per_gpu: int) -> dict:
    """One run in this process (CUDA_VISIBLE_DEVICES already set by the parent)."""
    from smartkv.bench.run.executor import ExecConfig
    from smartkv.bench.progress import Progress
    from smartkv.bench.results.store import ResultStore
    from smartkv.bench.submit import make_plan, submit

    plan = make_plan(grid, out)
    started = time.time()
    result = submit(plan, ExecConfig(workers_per_gpu=workers_per_gpu), progress=Progress())
    ended = time.time()
    stats = result.stats
    frame = ResultStore(out).read()[0].to_pandas()
    summary = frame[frame["row_kind"] == "summary"]
    return {
        "gpus": gpus, "workers": stats.workers, "workers_per_gpu": workers_per_gpu, "grid": plan.grid.name,
        "jobs": stats.finished, "statuses": stats.statuses, "models": len({j["model"]["name"] for j in plan.grid.jobs}),
        "wall_s": ended - started, "run_s": stats.run_s, "ended_at": ended, "run_started_at": ended - stats.run_s,
        "model_loads": stats.model_loads, "model_load_s": stats.model_load_s, "actor_start_s": stats.actor_start_s,
        "write_s": stats.write_s, "job_s": stats.job_s, "busy_fraction": stats.busy_fraction,
        "tail_fraction": stats.tail_fraction, "slowest_job_s": float(summary["wall_s"].max()),
        "busy_s": stats.busy_s,
    }


class GpuSampler:
    """nvidia-smi's utilisation.gpu of every GPU every `period_ms`, in a thread; empty where nvidia-smi is absent."""

    def __init__(self, period_ms: int = 500):
        self.samples: list[tuple[float, int, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                index, util = (x.strip() for x in line.split(","))
                self.samples.append((time.time(), int(index), float(util)))
            except ValueError:
                continue

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def mean(self, gpus: int, start: float, end: float) -> float | None:
        values = [u for t, i, u in self.samples if i < gpus and start <= t <= end]
        return sum(values) / len(values) / 100 if values else None


def run(grid: str, out_root: Path, gpus: int, workers_per_gpu: int, timeout_s: float | None) -> dict:
    out = out_root / f"{gpus}gpu"
    shutil.rmtree(out, ignore_errors=True)
    result_file = out_root / f"run-{gpus}gpu.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))), PYTHONUNBUFFERED="1")
    sampler = GpuSampler()
    try:
        subprocess.run([sys.executable, __file__, "--child", "--grid", grid, "--out", str(out), "--gpus", str(gpus),
                        "--workers-per-gpu", str(workers_per_gpu), "--result", str(result_file)],
                       env=env, check=True, timeout=timeout_s)
    finally:
        sampler.stop()
    record = json.loads(result_file.read_text())
    record["gpu_busy"] = sampler.mean(gpus, record["run_started_at"], record["ended_at"])
    result_file.write_text(json.dumps(record, indent=1))
    return record


def table(out_root: Path) -> str:
    runs = sorted((json.loads(p.read_text()) for p in out_root.glob("run-*gpu.json")), key=lambda r: r["gpus"])
    if not runs:
        return f"no runs in {out_root}"
    base = next((r for r in runs if r["gpus"] == 1), None)
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    lines = ["| GPUs | workers | jobs | wall s | run s | jobs/min | speedup | loads (s) | start s | writes s | busy "
             "| tail | GPU | slowest s |", "|" + "---|" * 14]
    for r in runs:
        rate = 60 * r["jobs"] / r["run_s"]
        speedup = f"{base['run_s'] / r['run_s']:.2f}x" if base else "-"
        failed = sum(n for s, n in r["statuses"].items() if s != "ok")
        jobs = f"{r['jobs']}" + (f" ({failed} failed)" if failed else "")
        lines.append(f"| {r['gpus']} | {r['workers']} | {jobs} | {r['wall_s']:.0f} | {r['run_s']:.0f} | {rate:.1f} | "
                     f"{speedup} | {r['model_loads']} ({r['model_load_s']:.0f}) | {r['actor_start_s']:.1f} | "
                     f"{r['write_s']:.2f} | {pct(r['busy_fraction'])} | {pct(r['tail_fraction'])} | "
                     f"{pct(r.get('gpu_busy'))} | {r['slowest_job_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default=str(ROOT / "jobs" / "scale.yaml"))
    ap.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts, each a run (default 1,2,4)")
    ap.add_argument("--workers-per-gpu", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "scale-bench")
    ap.add_argument("--timeout-s", type=float, default=None, help="give up on a run after this many seconds")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs in --out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.result.write_text(json.dumps(child(args.grid, args.out, int(args.gpus), args.workers_per_gpu)))
        return
    try:
        counts = [int(x) for x in args.gpus.split(",")]
    except ValueError:
        ap.error(f"--gpus: comma-separated positive integers, got {args.gpus!r}")
    if any(n < 1 for n in counts) or args.workers_per_gpu < 1:
        ap.error("--gpus and --workers-per-gpu: positive integers")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        import torch
        have = torch.cuda.device_count()
        if max(counts) > have:
            ap.error(f"--gpus: this machine has {have} GPUs, asked for {max(counts)}")
        from smartkv.bench.spec.grid import load_grid
        if any(j["model"]["name"] == "smollm2" for j in load_grid(args.grid).jobs):
            from smartkv.models import embedded_model_dir
            embedded_model_dir()  # the one-time conversion, outside the timing
        for n in counts:
            try:
                record = run(args.grid, args.out, n, args.workers_per_gpu, args.timeout_s)
            except subprocess.TimeoutExpired:
                print(f"{n} GPU(s): gave up after --timeout-s {args.timeout_s:.0f} s; its jobs so far are in "
                      f"{args.out / f'{n}gpu'}, no row for it", flush=True)
                continue
            except subprocess.CalledProcessError as exc:
                print(f"{n} GPU(s): the run failed (exit code {exc.returncode}, its output above); no row for it",
                      flush=True)
                continue
            print(f"{n} GPU(s): {record['jobs']} jobs in {record['run_s']:.0f} s", flush=True)
    text = table(args.out)
    (args.out / "scale.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
