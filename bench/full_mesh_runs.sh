#!/usr/bin/env bash
# Issue 16's acceptance runs, too long for the test suite: the full default digits config
# (1,500 steps, the `cnn` model) on 8 fake CPU devices in one process with data=2 x fsdp=4 and
# with data=8, and in 2 processes x 2 and x 4 devices through scripts/launch_local.sh. Each must
# train to completion within TIMEOUT_S (default 900) seconds; prints one line per run.
#
#   bench/full_mesh_runs.sh [RUN_ROOT]        # about 10 minutes on 2 idle cores
#
# tests/test_multihost.py keeps the short versions that caught the deadlock (see
# docs/cpu_collective_deadlock.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-$(mktemp -d /tmp/full_mesh_runs.XXXXXX)}"
mkdir -p "$root"
timeout_s="${TIMEOUT_S:-900}"
python="${PYTHON:-.venv/bin/python}"
[[ -x "$python" ]] || python=python3
config=(--config=configs/digits_cnn.py)
status=0

run() {
  local name="$1"
  shift
  local start=$SECONDS code=0 log="$root/${name//[^a-z0-9]/_}.log"
  timeout --kill-after=30 "$timeout_s" "$@" > "$log" 2>&1 || code=$?
  local result="done"
  grep -q "training done at step 1500" "$log" || result="FAILED (exit $code)"
  ((code == 0)) || result="FAILED (exit $code)"
  [[ $result == done ]] || status=1
  printf '%-24s %-20s %5d s  %s\n' "$name" "$result" $((SECONDS - start)) "$log"
}

export PYTHON="$python"  # For scripts/launch_local.sh.
one_process=(env XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
  "$python" -m trainer.main "${config[@]}")

run "1x8 data=2,fsdp=4" "${one_process[@]}" --workdir="$root/fsdp" --config.mesh.data=2 \
  --config.mesh.fsdp=4
run "1x8 data=8" "${one_process[@]}" --workdir="$root/data" --config.mesh.data=8
run "2x2 data=4" scripts/launch_local.sh --num_processes=2 --devices_per_process=2 -- \
  "${config[@]}" --workdir="$root/2x2"
run "2x4 data=8" scripts/launch_local.sh --num_processes=2 --devices_per_process=4 -- \
  "${config[@]}" --workdir="$root/2x4"
exit "$status"
