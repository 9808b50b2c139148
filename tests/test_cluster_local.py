"""cluster/local.sh: starts its own Ray head with token authentication, runs a grid on it, and stops only that head
(another Ray on the host, here the test session's, keeps running)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smartkv.bench.results.store import ResultStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(f"{cmdline.parent.name}: {args[:120]}")
    return found


def test_local_sh_runs_a_grid_with_token_auth_and_stops_only_its_own_ray(ray_session, write_grid, fake_worker,
                                                                        tmp_path):
    bystander = ray_session.put("still here")
    grid = write_grid("name: local\nmodels: [tiny-llama]\nmethods: [fp16, int8, int4]\n"
                      "prompt_sets: {passkey: {length: 256, num_samples: 1}}\n", "local.yaml")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), NUM_CPUS="2", PYTHON=sys.executable, TMPDIR="/tmp",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), str(grid), "--out", str(tmp_path / "out"),
                           "--workers", "2", "--no-progress"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = re.search(r"ray head: (\S+) \(process group (\d+), temp (\S+); auth token\)", proc.stderr)
    assert head, proc.stderr[-2000:]
    assert "ran 3 jobs (3 ok)" in proc.stdout
    assert len(list(ResultStore(tmp_path / "out").files())) == 3
    assert _processes_mentioning(head.group(3)) == []          # every process of its head is gone
    assert not Path(head.group(3)).exists()
    assert ray_session.get(bystander) == "still here"          # the other Ray on the host was left alone
    assert not (home / ".ray").exists()                          # its token was its own, not written to ~/.ray
