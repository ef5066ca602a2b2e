#!/usr/bin/env bash
# Stream the training log of a TPU VM / pod slice worker.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/logs.sh --name NAME --zone ZONE --project PROJECT
                           [--worker N|all] [--remote-dir DIR] [--log FILE] [--lines N] [--dry-run]

  --worker      which worker's log (default 0: process 0 writes metrics and progress)
  --remote-dir  where install.sh put the project (default: deqjax)
  --log         log file name used by launch.sh (default: deqjax_train.log)
  --lines       lines of history before following (default 100)
  --dry-run     print the gcloud command instead of running it
USAGE
}

WORKER="0"
REMOTE="deqjax"
LOG="deqjax_train.log"
LINES="100"
while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ $SHIFT_BY -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    --worker) need_value "$1" "${2-}"; WORKER="$2"; shift 2 ;;
    --remote-dir) need_value "$1" "${2-}"; REMOTE="$2"; shift 2 ;;
    --log) need_value "$1" "${2-}"; LOG="$2"; shift 2 ;;
    --lines) need_value "$1" "${2-}"; LINES="$2"; shift 2 ;;
    *) die_usage "unknown argument $1" ;;
  esac
done
require_common

run gcloud compute tpus tpu-vm ssh "$NAME" --worker="$WORKER" --zone="$ZONE" --project="$PROJECT" \
  --command="tail -n $LINES -F $REMOTE/$LOG"
