#!/usr/bin/env bash
# One machine: a private Ray head for this grid, the grid submitted to it, then that head stopped.
#
#   cluster/local.sh jobs/quick.yaml [more smartkv-bench submit options]
#   NUM_CPUS=8 NUM_GPUS=2 cluster/local.sh jobs/scale.yaml
#
# Assumes this repository's virtual environment is active (smartkv and ray installed). Everything stays on this
# machine: every Ray port binds 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's own switch for "single
# machine, loopback only"; it is set for `ray start` and for every process that joins), on free ports, so other
# Ray instances on the host are not disturbed. Token authentication is on: the caller's token is used if there is
# one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), else one is made for this head alone; set
# RAY_AUTH_MODE=disabled to run without. The head runs in its own process group and only that group is stopped at
# the end (never `ray stop`, which ends every Ray of this user on the host). Exit code: submit's.
#
# Without this script, `smartkv-bench submit --grid ...` starts (and stops) a private Ray by itself; a head started
# here is worth it to watch it with `ray status --address ...` while it runs (the address is printed first).
set -euo pipefail
grid="${1:?usage: cluster/local.sh GRID.yaml [submit options]}"
shift
python="${PYTHON:-python}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
workdir="$(mktemp -d "${TMPDIR:-/tmp}/skv-ray.XXXXXX")"   # short: Ray's socket paths must fit 107 bytes
head_group=""

stop_head() {
  if [[ -n "$head_group" && "$head_group" != "$(ps -o pgid= -p $$ | tr -d ' ')" ]]; then
    kill -TERM -- "-$head_group" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 -- "-$head_group" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$head_group" 2>/dev/null || true
  fi
  # Ray's autoscaler monitor may leave the group (its own session): it is found by this head's temp dir alone
  pkill -KILL -f -- "$workdir" 2>/dev/null || true
  rm -rf "$workdir"
}
trap stop_head EXIT
trap 'exit 130' INT TERM

if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
  export RAY_AUTH_MODE=token
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    (umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32))' > "$workdir/auth_token")
    export RAY_AUTH_TOKEN_PATH="$workdir/auth_token"
  fi
fi

read -r gcs_port client_port dashboard_port agent_port < <("$python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

# setsid: the head and every process it starts share a new process group, which stop_head ends as a whole.
setsid ray start --head --block --disable-usage-stats --node-ip-address=127.0.0.1 --port="$gcs_port" \
  --ray-client-server-port="$client_port" --dashboard-port="$dashboard_port" \
  --dashboard-agent-listen-port="$agent_port" --include-dashboard=false --dashboard-host=127.0.0.1 \
  --temp-dir="$workdir/ray" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} ${NUM_CPUS:+--num-cpus="$NUM_CPUS"} \
  > "$workdir/head.log" 2>&1 &
head_pid=$!
address="127.0.0.1:$gcs_port"
for _ in $(seq 1 240); do
  head_group="$(ps -o pgid= -p "$head_pid" | tr -d ' ')"   # its own once setsid has run
  if ! kill -0 "$head_pid" 2>/dev/null; then
    echo "error: the Ray head did not start; the end of its log ($workdir/head.log):" >&2
    tail -n 20 "$workdir/head.log" >&2
    exit 1
  fi
  if ray status --address "$address" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ -z "${ready:-}" ]]; then
  echo "error: the Ray head at $address did not answer within 120 s; the end of its log:" >&2
  tail -n 20 "$workdir/head.log" >&2
  exit 1
fi
echo "ray head: $address (process group $head_group, temp $workdir/ray; auth ${RAY_AUTH_MODE})" >&2
set +e
"$python" -m smartkv.bench.cli submit --grid "$grid" --address "$address" "$@"
status=$?
set -e
exit "$status"
