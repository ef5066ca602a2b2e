#!/usr/bin/env bash
# Start one training run on all workers of a TPU VM / pod slice at once.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/launch.sh --name NAME --zone ZONE --project PROJECT
                             --config CONFIG.py --workdir gs://BUCKET/RUN
                             [--remote-dir DIR] [--log FILE] [--dry-run] [-- TRAIN_FLAGS...]

  Runs `python -m experiments.train` in the background on every worker (one JAX
  process per host; jax.distributed.initialize finds the others). The workdir must
  be on GCS so that all hosts share the checkpoints; rerunning the same command
  resumes from the latest checkpoint (e.g. after a Spot preemption).

  --config      config file, relative to the repository (experiments/configs/...)
  --workdir     gs://... directory for checkpoints, metrics and reports
  --remote-dir  where install.sh put the project (default: deqjax)
  --log         log file on each worker (default: deqjax_train.log)
  --dry-run     print the gcloud command instead of running it
  -- ...        further flags for experiments.train, e.g. --config.train.epochs=10
USAGE
}

CONFIG=""
WORKDIR=""
REMOTE="deqjax"
LOG="deqjax_train.log"
EXTRA=()
while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ $SHIFT_BY -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    --config) need_value "$1" "${2-}"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$1" "${2-}"; WORKDIR="$2"; shift 2 ;;
    --remote-dir) need_value "$1" "${2-}"; REMOTE="$2"; shift 2 ;;
    --log) need_value "$1" "${2-}"; LOG="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die_usage "unknown argument $1" ;;
  esac
done
require_common
[[ -n "$CONFIG" ]] || die_usage "--config is required"
[[ "$WORKDIR" == gs://* ]] || die_usage "--workdir must be a gs:// path shared by all hosts"

ARGS=""
for a in "${EXTRA[@]}"; do
  ARGS+=" $(printf '%q' "$a")"
done
REMOTE_CMD="cd $REMOTE && DEQJAX_DISTRIBUTED=1 nohup .venv/bin/python -m experiments.train --config=$CONFIG --workdir=$WORKDIR$ARGS > $LOG 2>&1 < /dev/null &"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone="$ZONE" --project="$PROJECT" \
  --command="$REMOTE_CMD"
