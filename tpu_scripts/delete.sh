#!/usr/bin/env bash
# Delete a TPU VM / pod slice (checkpoints on GCS are kept).
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/delete.sh --name NAME --zone ZONE --project PROJECT [--yes] [--dry-run]

  --yes      do not ask for confirmation (gcloud --quiet)
  --dry-run  print the gcloud command instead of running it
USAGE
}

QUIET=()
while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ $SHIFT_BY -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    --yes) QUIET=(--quiet); shift ;;
    *) die_usage "unknown argument $1" ;;
  esac
done
require_common

run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT" "${QUIET[@]}"
