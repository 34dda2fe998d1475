#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM slice at once.
#
#   scripts/tpu/train.sh my-tpu-v5p-32 configs/lm.py:size=1.3b gs://bucket/runs/x [trainer flags]
#   ZONE=us-east5-a PROJECT=my-project REPO_DIR=~/jax-trainer scripts/tpu/train.sh ...
#   scripts/tpu/train.sh my-tpu configs/lm.py gs://bucket/run --dry_run   # print, do not run
#
# `--dry_run` may come anywhere. Any argument that looks like it means a dry run (`--dry-run`,
# `--dryrun`, `--dry_run=VALUE` with a value that is not false/0/no) is taken as one: printing
# the command by mistake costs nothing, starting a pod slice by mistake does. The first three
# arguments that do not start with `-` are TPU_NAME, CONFIG and WORKDIR; every other argument is
# passed to the trainer unchanged (write trainer flags as --flag=value).
#
# Every worker must already hold this repository at REPO_DIR with `make install-train` done.
# `--distributed=true` makes each worker start jax.distributed, which finds the slice's
# coordinator and its own index from the TPU metadata. The workdir should be a gs:// path (or
# shared storage): all workers write their checkpoint shards there.
set -euo pipefail

usage="usage: scripts/tpu/train.sh TPU_NAME CONFIG WORKDIR [trainer flags...] [--dry_run]"
dry_run=0
positional=()
trainer_flags=()
for arg in "$@"; do
  case "$arg" in
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    --dry_run=false | --dry_run=0 | --dry_run=no | --nodry_run) ;;
    --dry[-_]run | --dryrun | --dry[-_]run=* | --dryrun=*) dry_run=1 ;;
    -*) trainer_flags+=("$arg") ;;
    *)
      if ((${#positional[@]} < 3)); then
        positional+=("$arg")
      else
        trainer_flags+=("$arg")
      fi
      ;;
  esac
done
if ((${#positional[@]} < 3)); then
  echo "$usage" >&2
  exit 2
fi
tpu="${positional[0]}"
config="${positional[1]}"
workdir="${positional[2]}"
repo_dir="${REPO_DIR:-~/jax-trainer}"

remote="cd $repo_dir && .venv/bin/python -m trainer.main --distributed=true"
remote+=" --config=$(printf %q "$config") --workdir=$(printf %q "$workdir")"
for arg in "${trainer_flags[@]}"; do
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
