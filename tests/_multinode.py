"""Run by tests/test_multinode.py in its own process (its own Ray): a grid on a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster), one node removed mid-grid. Prints a JSON summary on its last line.

    python tests/_multinode.py GRID OUT
"""
from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from smartkv.bench.results.store import ResultStore
from smartkv.bench.run.executor import ExecConfig
from smartkv.bench.submit import make_plan, submit

# Node failures detected in about a second instead of Ray's default ~30 s.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
               "health_check_failure_threshold": 3}


def main(grid: str, out: str) -> dict:
    # The head has room for one worker, the other node for two: the grid starts on three actors, two of them on
    # the node that goes away.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH})
    other = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    removed = {}

    def remove_after_two_results():
        deadline = time.time() + 120
        while time.time() < deadline and len(list(ResultStore(out).files())) < 2:
            time.sleep(0.05)
        removed["after_results"] = len(list(ResultStore(out).files()))
        removed["node_id"] = other.node_id
        cluster.remove_node(other, allow_graceful=False)
        removed["at"] = time.time()

    killer = threading.Thread(target=remove_after_two_results, daemon=True)
    killer.start()
    plan = make_plan(grid, out)
    start = time.time()
    result = submit(plan, ExecConfig(address=cluster.address, workers=3, poll_s=0.1, actor_start_timeout_s=60))
    killer.join(5)
    alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    summary = {"jobs": len(plan.grid.jobs), "statuses": result.stats.statuses, "restarts": result.stats.restarts,
               "retried": result.stats.retried, "finished": result.stats.finished, "workers": result.stats.workers,
               "removed_after_results": removed.get("after_results"),
               "removed_node_alive": alive.get(removed.get("node_id")),
               "finished_after_removal_s": time.time() - removed.get("at", time.time()), "run_s": time.time() - start}
    ray.shutdown()
    cluster.shutdown()
    return summary


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])), flush=True)
