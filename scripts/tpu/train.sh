#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM slice at once.
#
#   scripts/tpu/train.sh my-tpu-v5p-32 configs/lm.py:size=1.3b gs://bucket/runs/x [trainer flags]
#   ZONE=us-east5-a PROJECT=my-project REPO_DIR=~/jax-trainer scripts/tpu/train.sh ...
#   scripts/tpu/train.sh --dry_run my-tpu configs/lm.py gs://bucket/run   # print, do not run
#
# Every worker must already hold this repository at REPO_DIR with `make install-train` done.
# `--distributed=true` makes each worker start jax.distributed, which finds the slice's
# coordinator and its own index from the TPU metadata. The workdir should be a gs:// path (or
# shared storage): all workers write their checkpoint shards there.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 3 ]]; then
  echo "usage: scripts/tpu/train.sh [--dry_run] TPU_NAME CONFIG WORKDIR [trainer flags...]" >&2
  exit 2
fi
tpu="$1"
config="$2"
workdir="$3"
shift 3
repo_dir="${REPO_DIR:-~/jax-trainer}"

remote="cd $repo_dir && .venv/bin/python -m trainer.main --distributed=true"
remote+=" --config=$(printf %q "$config") --workdir=$(printf %q "$workdir")"
for arg in "$@"; do
  remote+=" $(printf %q "$arg")"
done
command=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --command="$remote")
[[ -n "${ZONE:-}" ]] && command+=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && command+=(--project="$PROJECT")

if ((dry_run)); then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if ! command -v gcloud > /dev/null; then
  echo "train.sh: gcloud not found; install the Google Cloud CLI (or use --dry_run)" >&2
  exit 2
fi
exec "${command[@]}"
