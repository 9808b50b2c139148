"""What the CLI shows on a terminal: the live progress of a run and the comparison table (rich renderables)."""
from __future__ import annotations

from smartkv.bench.progress import Progress
from smartkv.bench.results import report as report_lib


class ProgressView:
    """Live display (rich) of a Progress on a terminal; elsewhere one line each time a job finishes."""

    def __init__(self, console, live: bool):
        self.console, self.live, self._shown, self._notes = console, None, 0, 0
        if live:
            from rich.live import Live
            self.live = Live(console=console, refresh_per_second=4, transient=False)

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def update(self, state: Progress) -> None:
        for message in state.messages[self._notes:]:
            self.console.print(f"[yellow]{message}[/yellow]")
        self._notes = len(state.messages)
        if self.live:
            self.live.update(self._render(state))
        elif state.done != self._shown:
            self._shown = state.done
            self.console.print(self._headline(state))

    @staticmethod
    def _headline(state: Progress) -> str:
        eta = "?" if state.eta_s is None else _clock(state.eta_s)
        return (f"jobs {state.done}/{state.total} done, {state.failed} failed, {state.oom} oom, "
                f"{state.retried} retried | elapsed {_clock(state.elapsed_s)} | ETA {eta}")

    def _render(self, state: Progress):
        from rich.table import Table

        table = Table(title=self._headline(state), title_justify="left", box=None)
        for col in ("worker", "done", "loads", "restarts", "running"):
            table.add_column(col)
        for slot in state.slots.values():
            table.add_row(slot.name, str(slot.done), str(slot.model_loads), str(slot.restarts), slot.current or "-")
        return table


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def render_table(console, table, baseline: str) -> None:
    """The terminal view: the same numbers as report.md, with intervals folded into their columns."""
    from rich.table import Table

    def pm(value, ci) -> str:
        text = report_lib._fmt(value)
        return f"{text} ± {report_lib._fmt(ci)}" if text and report_lib._fmt(ci) else text

    view = Table(show_lines=False, pad_edge=False)
    headers = ("model", "prompt set", "method", "n", "fail", "score", f"Δ {baseline}", "ppl", "KL", "mem", "bits",
               "prefill tok/s", "decode tok/s", "TTFT ms", "TPOT ms", "out tok", "e2e ms")
    for head in headers:
        view.add_column(head, no_wrap=head in ("method", "score"))
    for r in table.itertuples(index=False):
        view.add_row(r.model, r.prompt_set, r.method, str(r.samples), str(r.failed + r.oom), pm(r.score, r.score_ci95),
                     report_lib._fmt(r.delta_vs_baseline), report_lib._fmt(r.ppl), report_lib._fmt(r.kl_to_fp16),
                     report_lib._fmt(r.total_ratio), report_lib._fmt(r.avg_bits),
                     pm(r.prefill_tok_s, r.prefill_ci95), pm(r.decode_tok_s, r.decode_ci95),
                     *(report_lib._fmt(getattr(r, c)) for c in report_lib.SERVING))
    console.print(view)
