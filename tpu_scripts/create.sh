#!/usr/bin/env bash
# Create a Cloud TPU VM or a multi-host pod slice.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/create.sh --name NAME --zone ZONE --project PROJECT
                             --accelerator-type TYPE --version RUNTIME [--spot] [--dry-run]

  --name              TPU VM / pod slice name
  --zone              e.g. us-central2-b
  --project           GCP project id
  --accelerator-type  e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-16
  --version           TPU software version, e.g. tpu-ubuntu2204-base
  --spot              a preemptible (Spot) TPU: training saves and exits on SIGTERM
  --dry-run           print the gcloud command instead of running it
USAGE
}

ACCEL=""
VERSION=""
SPOT=()
while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ $SHIFT_BY -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    --accelerator-type) need_value "$1" "${2-}"; ACCEL="$2"; shift 2 ;;
    --accelerator-type=*) ACCEL="${1#*=}"; shift ;;
    --version) need_value "$1" "${2-}"; VERSION="$2"; shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --spot) SPOT=(--spot); shift ;;
    *) die_usage "unknown argument $1" ;;
  esac
done
require_common
[[ -n "$ACCEL" ]] || die_usage "--accelerator-type is required"
[[ -n "$VERSION" ]] || die_usage "--version is required"

run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --project="$PROJECT" \
  --accelerator-type="$ACCEL" --version="$VERSION" "${SPOT[@]}"
