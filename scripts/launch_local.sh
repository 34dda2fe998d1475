#!/usr/bin/env bash
# Rehearses a multi-host job on this machine: N trainer processes, each with its own fake CPU
# devices, joined by jax.distributed through a coordinator on localhost.
#
#   scripts/launch_local.sh --num_processes=2 --devices_per_process=4 -- \
#       --config=configs/digits_cnn.py:smoke --workdir=/tmp/mh
#
# Every argument after `--` goes to `python -m trainer.main` in every process. Output lines are
# prefixed with the process index; only process 0 prints progress lines. If any process fails, the others are stopped and the launcher
# exits with the failing process's status. SIGTERM/SIGINT to the launcher reach every process
# (each saves a checkpoint and exits 0). Stopping is SIGTERM, then, after --grace_seconds
# (default 60), SIGKILL to every process still running and to its children.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

num_processes=2
devices_per_process=4
grace_seconds=60
port=""
# The project's environment when there is one (make install), else whatever python is on PATH.
default_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
[[ -x "$default_python" ]] || default_python=python3
python="${PYTHON:-$default_python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --grace_seconds=*) grace_seconds="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "launch_local.sh: unknown argument '$1' (trainer arguments go after --)" >&2; usage ;;
  esac
  shift
done
for value in "$num_processes" "$devices_per_process"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch_local.sh: process and device counts must be positive integers, got '$value'" >&2
    exit 2
  fi
done
if ! [[ "$grace_seconds" =~ ^[0-9]+$ ]]; then
  echo "launch_local.sh: --grace_seconds must be a whole number of seconds, got '$grace_seconds'" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "launch_local.sh: no trainer arguments; give them after --, e.g. -- --config=... --workdir=..." >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# Each trainer leads its own process group (setsid), so SIGKILL reaches its children too.
new_group=()
command -v setsid > /dev/null && new_group=(setsid)
pids=()
killer=""
kill_after_grace() {
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  sleep "$grace_seconds" &
  sleeper=$!
  wait "$sleeper"
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "launch_local.sh: pid $pid still running ${grace_seconds}s after SIGTERM; sending SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
stop_all() {
  [[ -n "$killer" ]] && return  # Already stopping.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  kill_after_grace &
  killer=$!
}
trap 'stop_all' TERM INT
trap '[[ -n "$killer" ]] && kill "$killer" 2>/dev/null; wait' EXIT

# Gloo's native code prints one "connected to N peer ranks" line per process at start-up, which
# nothing can turn off from Python; the launcher drops exactly those.
gloo_noise='/^\[Gloo\] Rank [0-9]* is connected to [0-9]* peer ranks/d'
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process" \
  JAX_PLATFORMS=cpu \
    "${new_group[@]}" "$python" -u -m trainer.main "$@" \
      --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
      > >(sed -u -e "$gloo_noise" -e "s/^/[process $i] /") 2> >(sed -u -e "$gloo_noise" -e "s/^/[process $i] /" >&2) &
  pids+=("$!")
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=""
  if wait -n -p finished "${running[@]}"; then
    code=0
  else
    code=$?
  fi
  if [[ -z "${finished:-}" ]]; then
    # Our own wait was interrupted by the trap (the processes are saving their checkpoint) or
    # nothing is left to wait for.
    ((code > 128)) && continue
    break
  fi
  running=("${running[@]/$finished/}")
  read -r -a running <<< "${running[*]}"
  if ((code != 0 && status == 0)); then
    status=$code
    echo "launch_local.sh: process with pid $finished exited with status $code; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
