#!/usr/bin/env bash
# One machine, an explicit Ray head, then a grid submitted to it.
#
# Assumes: this repository's virtual environment is active (smartkv and ray installed), no other Ray head on this
# machine, and you want nothing reachable from the network: every Ray port and the dashboard stay on 127.0.0.1.
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's own switch for "single machine, loopback only"; it must be set for
# `ray start` and for every process that joins, which this script does.)
#
#   cluster/local.sh jobs/quick.yaml [more smartkv-bench submit options]
#   ray stop                      # when done
#
# Without this script, `smartkv-bench submit --grid ...` starts (and stops) a private Ray on 127.0.0.1 by itself;
# a head started here is worth it when several submits share it, or to watch the dashboard.
set -euo pipefail
grid="${1:?usage: cluster/local.sh GRID.yaml [submit options]}"
shift
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if ! ray status >/dev/null 2>&1; then
  ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --include-dashboard=false \
    ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} ${NUM_CPUS:+--num-cpus="$NUM_CPUS"}
fi
exec smartkv-bench submit --grid "$grid" --address auto "$@"
