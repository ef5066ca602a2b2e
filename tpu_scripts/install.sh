#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM / pod slice and install it there.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/install.sh --name NAME --zone ZONE --project PROJECT
                              [--source DIR] [--remote-dir DIR] [--dry-run]

  Copies DIR (default: this repository) to REMOTE-DIR (default: deqjax, in the
  home directory) on ALL workers, then creates REMOTE-DIR/.venv with jax[tpu] and
  the project installed in editable mode.

  --source      local checkout to copy (default: the repository holding this script)
  --remote-dir  directory on the workers (default: deqjax)
  --dry-run     print the gcloud commands instead of running them
USAGE
}

SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE="deqjax"
while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ $SHIFT_BY -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    --source) need_value "$1" "${2-}"; SOURCE="$2"; shift 2 ;;
    --remote-dir) need_value "$1" "${2-}"; REMOTE="$2"; shift 2 ;;
    *) die_usage "unknown argument $1" ;;
  esac
done
require_common

ARCHIVE="/tmp/deqjax_src.tar.gz"
run tar --exclude=.venv --exclude=runs --exclude=.git --exclude=__pycache__ -czf "$ARCHIVE" -C "$SOURCE" .
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:deqjax_src.tar.gz" --worker=all \
  --zone="$ZONE" --project="$PROJECT"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone="$ZONE" --project="$PROJECT" \
  --command="mkdir -p $REMOTE && tar -xzf deqjax_src.tar.gz -C $REMOTE && cd $REMOTE && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q 'jax[tpu]' -e . && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
