"""smartkv-bench: run grids of (model x KV method x prompt set) jobs on Ray and compare the results.

The only module of the runner that prints. Exit codes: 0 done; 1 some jobs failed, or the run could not proceed
(output directory in use, Ray unreachable, a write failed); 2 bad input (grid file, option, output directory),
nothing written; 130 interrupted (finished jobs are kept, submit again to resume).
"""
from __future__ import annotations

import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from smartkv.bench.results import plots as plots_lib
from smartkv.bench.results import report as report_lib
from smartkv.bench.run.executor import ExecConfig, ExecError, RunStats
from smartkv.bench.spec.grid import GridError
from smartkv.bench.progress import Progress
from smartkv.bench.redact import RedactingFilter, RedactingStream, redact
from smartkv.bench.view import ProgressView, render_table
from smartkv.bench.results.store import ResultStore, StoreError, LockBusy

# Typer vendors click; its UsageError is the base of the exported BadParameter.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (missing option, not an integer, unknown command) as one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            raise typer.Exit(Exit.USAGE) from None


app = typer.Typer(cls=_OneLineUsageErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, help=__doc__.split("\n")[0])
FORMATS = ("table", "md", "csv")


class Exit:
    OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {redact(message)}", err=True)
    return typer.Exit(code)


def _check_range(option: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise _fail(f"{option}: must be an integer in [{lo}, {hi}], got {value}", Exit.USAGE)


def _console(stderr: bool = False):
    """Rich console that masks secrets; wide when not a terminal, so tables in logs and pipes are not folded."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=RedactingStream(stream), highlight=False, soft_wrap=False,
                   width=None if stream.isatty() else 200)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler
    handler = RichHandler(console=_console(stderr=True), show_path=False)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, force=True, handlers=[handler])


@app.command()
def submit(
    grid: Annotated[Path, typer.Option("--grid", help="Grid file (YAML), e.g. jobs/quick.yaml.")],
    address: Annotated[Optional[str], typer.Option(
        help="Join this Ray cluster ('auto': the one `ray start` made here). Default: a private Ray on 127.0.0.1.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results directory. Default: results/<grid name>.")] = None,
    force: Annotated[bool, typer.Option(help="Rerun jobs that already have results.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Rerun jobs whose results say error or oom.")] = False,
    rerun_stale: Annotated[bool, typer.Option(
        help="Rerun jobs whose results came from other smartkv code or torch/transformers versions.")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="List the jobs and which are done, and estimate the time and GPU-hours of the rest; run no job.")] = False,
    calibrate: Annotated[bool, typer.Option(
        help="With --dry-run: time methods with no measured rate in a short run on this machine.")] = True,
    max_inflight: Annotated[Optional[int], typer.Option(
        help="Jobs queued on all workers at once (default: 2 per worker).")] = None,
    local: Annotated[bool, typer.Option(help="Run in this process without Ray (debugging).")] = False,
    workers: Annotated[Optional[int], typer.Option(
        help="Worker actors (default: one per GPU, else CPUs / cpus-per-worker).")] = None,
    cpus_per_worker: Annotated[int, typer.Option(help="CPUs each worker reserves (and its torch threads).")] = 1,
    workers_per_gpu: Annotated[int, typer.Option(
        help="Workers sharing each GPU (Ray fractional GPUs; for small models, which leave a GPU idle).")] = 1,
    max_attempts: Annotated[int, typer.Option(help="Tries of a job whose worker process died.")] = 3,
    progress: Annotated[Optional[bool], typer.Option(
        help="Live progress display (default: when stderr is a terminal).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    """Run the jobs of a grid that have no results yet, then print the comparison table."""
    from smartkv.bench import submit as submit_lib

    _setup_logging(verbose)
    _check_range("--workers", workers, 1, 1024)
    _check_range("--cpus-per-worker", cpus_per_worker, 1, 256)
    _check_range("--workers-per-gpu", workers_per_gpu, 1, 64)
    _check_range("--max-inflight", max_inflight, 1, 100_000)
    _check_range("--max-attempts", max_attempts, 1, 20)
    if address is not None and not address.strip():
        raise _fail("--address: must be 'auto', host:port or ray://host:port, got an empty string", Exit.USAGE)
    try:
        plan = submit_lib.make_plan(grid, out, force=force, retry_failed=retry_failed, rerun_stale=rerun_stale)
    except GridError as exc:
        raise _fail(str(exc), Exit.USAGE) from None
    _warn([line for line in (submit_lib.stale_line(plan),) if line])
    if dry_run:
        from smartkv.bench.estimate import renderables
        _print_plan(plan, force)
        for item in renderables(plan, workers, workers_per_gpu, calibrate, lambda model, methods: _console(
                stderr=True).print(f"calibrating {model} on this machine: {', '.join(methods)} ...")):
            _console().print(item)
        return
    if not plan.pending:
        _console().print(f"Nothing to run: all {len(plan.grid.jobs)} jobs of grid '{plan.grid.name}' already have "
                         f"results in {plan.store.root} (--force reruns them).")
        _print_report(plan.store, "fp16", save=False)
        return
    config = ExecConfig(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                        workers_per_gpu=workers_per_gpu, max_inflight=max_inflight, max_attempts=max_attempts,
                        local=local)
    result = _run(submit_lib, plan, config, dict(force=force, retry_failed=retry_failed, rerun_stale=rerun_stale),
                  progress)
    _finish(result, plan)


def _run(submit_lib, plan, config: ExecConfig, selection: dict, show: Optional[bool]):
    signal.signal(signal.SIGTERM, _raise_interrupt)
    state = Progress()
    try:
        submit_lib.check_ready(plan, config)
    except (GridError, StoreError) as exc:
        raise _fail(str(exc), Exit.USAGE) from None
    except ExecError as exc:
        raise _fail(str(exc), Exit.FAILED) from None
    _console(stderr=True).print(f"grid '{plan.grid.name}': {len(plan.pending)} of {len(plan.grid.jobs)} jobs to run, "
                                f"results in {plan.store.root}")
    view = ProgressView(_console(stderr=True), live=sys.stderr.isatty() if show is None else show)
    try:
        with view:
            return submit_lib.submit(plan, config, **selection, progress=state, on_tick=view.update)
    except LockBusy as exc:
        raise _fail(str(exc), Exit.FAILED) from None
    except StoreError as exc:  # a write failed mid-run (disk full, ...): what was written stays valid
        raise _fail(str(exc), Exit.FAILED) from None
    except ExecError as exc:
        raise _fail(str(exc), Exit.FAILED) from None
    except KeyboardInterrupt:
        raise _fail(f"interrupted: {state.done} jobs finished and saved; submit again to resume",
                    Exit.INTERRUPTED) from None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _finish(result, plan) -> None:
    stats: RunStats = result.stats
    console = _console()
    if stats.interrupted:
        raise _fail(f"interrupted: {stats.finished} jobs finished and saved, {stats.lost_in_flight} in flight lost; "
                    "submit again to resume", Exit.INTERRUPTED)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(stats.statuses.items()))
    console.print(f"ran {stats.finished} jobs ({counts}); {stats.model_loads} model loads "
                  f"({stats.model_load_s:.1f} s), workers started in {stats.actor_start_s:.1f} s, {stats.retried} "
                  f"retries after worker deaths; results in {plan.store.root}")
    if stats.run_s > 0 and stats.busy_fraction is not None:
        console.print(f"time: {stats.run_s:.1f} s on {stats.workers} workers, "
                      f"{60 * stats.finished / stats.run_s:.1f} jobs/min; workers busy {stats.busy_fraction:.0%} "
                      f"(idle after their last job {stats.tail_fraction:.0%}); driver writes {stats.write_s:.1f} s")
    _print_report(plan.store, "fp16", save=True)
    if stats.statuses.get("error"):
        raise _fail(f"{stats.statuses['error']} jobs failed; see the error column, fix, then submit "
                    "--retry-failed", Exit.FAILED)


def _print_plan(plan, force: bool) -> None:
    from rich.table import Table

    from smartkv.bench.run.executor import job_label

    table = Table(title=f"grid '{plan.grid.name}' -> {plan.store.root}")
    for col in ("job_id", "job", "seed", "state"):
        table.add_column(col)
    pending = {j["job_id"] for j in plan.pending}
    for job in plan.grid.jobs:
        done = plan.done.get(job["job_id"])
        state = "to run" if job["job_id"] in pending else f"done ({done.status})"
        if force and done:
            state = f"rerun (was {done.status})"
        table.add_row(job["job_id"], job_label(job), str(job["seed"]), state)
    console = _console()
    console.print(table)
    console.print(f"{len(plan.grid.jobs)} jobs, {len(plan.done)} done, {len(plan.pending)} to run"
                  + (f", {len(plan.corrupt)} unusable files (smartkv-bench status names them)" if plan.corrupt else ""))


def _print_report(store: ResultStore, baseline: str, save: bool) -> None:
    data, warnings = store.read()
    _warn(warnings)
    frame = data.to_pandas()
    table = report_lib.summarize(frame, baseline)
    render_table(_console(), table, baseline)
    if save and not table.empty:
        files = {"report.md": report_lib.to_markdown(table, baseline).encode(),
                 "report.csv": report_lib.to_csv(table, baseline).encode()}
        with tempfile.TemporaryDirectory(prefix="smartkv-report-") as scratch:  # private: plots, then copied in
            files.update({p.name: p.read_bytes() for p in plots_lib.plot(frame, table, scratch)})
        try:  # the results are written; a report that cannot be is a warning, not a failed run
            out = store.write_report_files(files)
        except (StoreError, OSError) as exc:
            _warn([f"cannot write the report: {exc}"])
            return
        _console().print(f"report: {out}/report.md, report.csv, *.png")


def _warn(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"warning: {redact(line)}", err=True)


@app.command()
def status(
    grids: Annotated[Optional[list[Path]], typer.Argument(help="Grid files (default: jobs/*.yaml).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results directory (only with one grid).")] = None,
) -> None:
    """Done / failed / pending jobs per grid, and every file in a results folder that is not a usable result."""
    from rich.table import Table

    from smartkv.bench import submit as submit_lib
    from smartkv.bench.submit import make_plan

    grids = grids or sorted(Path("jobs").glob("*.yaml"))
    if out is not None and len(grids) != 1:
        raise _fail("--out: give exactly one grid file with --out", Exit.USAGE)
    table = Table()
    for col in ("grid", "jobs", "done", "ok", "error", "oom", "pending", "bad files", "stale", "results"):
        table.add_column(col)
    problems = []
    for path in grids:
        try:
            plan = make_plan(path, out)
        except GridError as exc:
            raise _fail(str(exc), Exit.USAGE) from None
        statuses = [f.status for f in plan.done.values()]
        table.add_row(plan.grid.name, str(len(plan.grid.jobs)), str(len(plan.done)), str(statuses.count("ok")),
                      str(statuses.count("error")), str(statuses.count("oom")), str(len(plan.pending)),
                      str(len(plan.corrupt)), str(len(plan.stale)), str(plan.store.root))
        problems += submit_lib.problem_lines(plan) + [line for line in (submit_lib.stale_line(plan),) if line]
    _console().print(table)
    _warn(problems)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="Results directory, e.g. results/quick.")],
    baseline: Annotated[str, typer.Option(help="Method the delta column compares against.")] = "fp16",
    format: Annotated[str, typer.Option("--format", help="table | md | csv")] = "table",
    plot: Annotated[Optional[Path], typer.Option(help="Write PNG plots into this directory.")] = None,
) -> None:
    """Comparison table per (model, prompt set, method + params) of a results directory."""
    if format not in FORMATS:
        raise _fail(f"--format: must be one of {', '.join(FORMATS)}, got {format!r}", Exit.USAGE)
    if not results.is_dir():
        raise _fail(f"RESULTS: {results} is not a directory of results", Exit.USAGE)
    data, warnings = ResultStore(results).read()
    _warn(warnings)
    frame = data.to_pandas()
    table = report_lib.summarize(frame, baseline)
    if format == "table":
        render_table(_console(), table, baseline)
    else:
        render = report_lib.to_markdown if format == "md" else report_lib.to_csv
        typer.echo(render(table, baseline), nl=False)
    if plot is not None:
        for path in plots_lib.plot(frame, table, plot):
            typer.echo(f"wrote {path}", err=True)


@app.command()
def ls() -> None:
    """Methods, prompt sets and models a grid can name."""
    from smartkv.bench.spec import catalog as catalog_mod

    catalog = catalog_mod.default_catalog()
    console = _console()
    for title, names in (("methods", catalog.method_names()), ("prompt sets", catalog.prompt_set_names()),
                         ("models", catalog.model_names())):
        console.print(f"[bold]{title}[/bold]: {', '.join(names)}")
    console.print("models may also be an HF hub id (org/name) or a local directory (./path or /path)")


@app.command()
def analyze(
    model: Annotated[str, typer.Option(
        help="smollm2 or gemma3 (the embedded models), an HF id or a local path.")] = "smollm2",
    ctx: Annotated[int, typer.Option(help="Prompt tokens of CPython's documentation prose.")] = 1024,
    decode: Annotated[int, typer.Option(help="Tokens decoded after the prompt (teacher forced).")] = 64,
    budget: Annotated[float, typer.Option(help="SmartKV budget whose bit allocation is drawn.")] = 4.25,
    out: Annotated[Path, typer.Option(help="Directory for the PNG plots.")] = Path("analysis"),
) -> None:
    """Attention analysis: how concentrated attention is per layer and head (entropy, top-1%/10% share), how
    stable importance ranks are while decoding, and the bits SmartKV allocates (PNG plots and a table)."""
    _check_range("--ctx", ctx, 64, 1 << 20)
    _check_range("--decode", decode, 1, 1 << 16)
    if not 2 <= budget <= 8:
        raise _fail(f"--budget: must be a number of bits in [2, 8], got {budget}", Exit.USAGE)
    from smartkv import analysis
    from smartkv.models import load_model

    try:
        handle = load_model(model)
    except (OSError, ValueError) as exc:
        raise _fail(f"--model: cannot load {model!r}: {str(exc).splitlines()[0]}", Exit.USAGE) from None
    result = analysis.analyze_attention(handle.model, handle.tokenizer, ctx, decode,
                                        smartkv_params={"budget": budget})
    for path in analysis.plot_analysis(result, out):
        typer.echo(f"wrote {path}", err=True)
    typer.echo(analysis.summary_table(result))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
