"""benchmarks/syncs.py counts the operations that make the host wait for a GPU, on any device, and nothing else."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from syncs import SyncCounter, device_waits  # noqa: E402


def test_device_only_work_counts_no_host_wait():
    x = torch.arange(64.0)
    with SyncCounter() as c:
        y = torch.topk(x * 2 + 1, 5).values.sort().values
        x.repeat_interleave(2)
        torch.repeat_interleave(x, torch.full((64,), 2), output_size=128)
        x[torch.tensor([1, 5])]
    assert c.total == 0 and y.numel() == 5


def test_each_kind_of_host_wait_is_counted_once():
    x = torch.arange(16.0)
    with SyncCounter() as c:
        x.tolist(), x.numpy(), x[3].item(), bool(x[1] > 0), int(x.sum())
        x[x > 3], torch.nonzero(x), x.unique(), torch.repeat_interleave(torch.tensor([1, 2]))
    assert c.by_kind == {"tolist": 1, "numpy": 1, "item": 3, "boolean index": 1, "nonzero": 1, "_unique2": 1,
                         "repeat_interleave": 1}
    assert c.total == 9 and sum(c.by_site.values()) == 9


def test_only_tensors_on_the_counted_device_count():
    x = torch.arange(16.0)
    with SyncCounter("cuda") as c:  # host tensors: nothing to wait for
        x.tolist(), x[3].item(), x[x > 3]
    assert c.total == 0


def test_ops_count_work_not_views_or_allocations():
    x = torch.arange(16.0)
    with SyncCounter() as c:
        x.view(4, 4)[1:].t().T.reshape(2, 6), torch.empty(3), torch.empty_like(x)  # views, allocations: no launch
        y = (x * 2 + 1).sort().values                                            # three ops that do work
        x.view(4, 4).t().reshape(-1)                                             # a copy: one more
        torch.zeros(4), torch.arange(3)                                          # factories fill: two more
    assert c.ops == 6 and c.total == 0 and y.numel() == 16


def test_a_block_re_allocation_is_counted_in_a_round_that_re_allocates():
    # blocks of 16 flush whole blocks: every other round of new tokens re-allocates nothing, and a count taken
    # from such a round read 0 ops and 0 waits on the H200 (2026-12-03)
    from profile_realloc import profile

    r = profile(dict(budget=4.25, key_value_gap=3, block_tokens=16, realloc="incremental"), batch=1, context=512,
                rounds=2, device=torch.device("cpu"), count_syncs=True)
    assert r["rounds_a_realloc"] > 1 and r["realloc_ops"] > 100


def test_device_waits_records_the_sync_warning_with_project_frames_and_shows_the_rest(recwarn):
    """torch's sync debug mode warns "called a synchronizing CUDA operation" from inside the op: each such warning is
    recorded with its caller's smartkv frames, outermost first (here a solve run by `solves.solve_asks` warns as
    torch would); any other warning is shown as usual."""
    import warnings

    from smartkv.core.solves import solve_asks

    def solve():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        return 1
        yield

    with device_waits() as found:
        warnings.warn("called a synchronizing CUDA operation", UserWarning)   # from here: no project frame
        assert solve_asks([solve()]) == [1]
        warnings.warn("something else", FutureWarning)
    assert [[f.name for f in frames] for frames in found] == [[], ["solve_asks", "step"]]
    assert [str(w.message) for w in recwarn] == ["something else"]
