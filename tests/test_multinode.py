"""A grid on a two-node Ray cluster on this machine (Ray's own cluster utilities), one node removed mid-grid: the
jobs of the lost node's actors run again on the node that is left, and every (job, sample) row ends up in the
results exactly once. Runs in its own process, so its Ray is not the test session's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from smartkv.bench.results.store import ResultStore
from smartkv.bench.spec.grid import load_grid

pytestmark = pytest.mark.slow

GRID = """\
name: nodes
models: [tiny-llama]
methods: [fp16, int8, int4, kivi]
prompt_sets:
  passkey: {length: [256, 512, 1024], num_samples: 2}
"""


def test_a_grid_survives_losing_a_node(write_grid, fake_worker, tmp_path):
    grid, out = write_grid(GRID, "nodes.yaml"), tmp_path / "out"
    jobs = load_grid(grid).jobs
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SMARTKV_FAKE_SLEEP_S="0.6", RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_multinode.py")), str(grid), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        try:  # the cluster's processes (same session), so nothing outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["removed_after_results"] >= 2 and summary["removed_node_alive"] is False
    assert summary["restarts"] >= 1, summary  # actors of the lost node were replaced (their jobs requeued)
    assert summary["statuses"] == {"ok": len(jobs)} and summary["finished"] == len(jobs), summary
    frame = ResultStore(out).read()[0].to_pandas()
    assert sorted(frame["job_id"].unique()) == sorted(j["job_id"] for j in jobs)
    per_row = frame.groupby(["job_id", "row_kind", "sample_id"], dropna=False).size()
    assert per_row.eq(1).all() and len(frame) == len(jobs) * 3  # 2 samples + 1 summary each, nothing twice
    print(json.dumps(summary))
