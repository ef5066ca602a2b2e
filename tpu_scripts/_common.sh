# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are read by the scripts that source this file
# Shared by the tpu_scripts (sourced, not run): flag helpers and dry-run execution.

DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""

# die_usage MESSAGE: print the error and the calling script's usage, exit 2.
die_usage() {
  echo "error: $1" >&2
  usage >&2
  exit 2
}

# need_value FLAG VALUE: a flag that takes a value must get one.
need_value() {
  if [[ -z "${2-}" || "${2-}" == --* ]]; then
    die_usage "$1 needs a value"
  fi
}

# common_flag FLAG [VALUE]: handle --name/--zone/--project/--dry-run; sets SHIFT_BY
# (0 = not a common flag).
common_flag() {
  SHIFT_BY=0
  case "$1" in
    --name) need_value "$1" "${2-}"; NAME="$2"; SHIFT_BY=2 ;;
    --zone) need_value "$1" "${2-}"; ZONE="$2"; SHIFT_BY=2 ;;
    --project) need_value "$1" "${2-}"; PROJECT="$2"; SHIFT_BY=2 ;;
    --name=*) NAME="${1#*=}"; SHIFT_BY=1 ;;
    --zone=*) ZONE="${1#*=}"; SHIFT_BY=1 ;;
    --project=*) PROJECT="${1#*=}"; SHIFT_BY=1 ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h|--help) usage; exit 0 ;;
  esac
}

# require_common: --name, --zone and --project are mandatory everywhere.
require_common() {
  [[ -n "$NAME" ]] || die_usage "--name is required"
  [[ -n "$ZONE" ]] || die_usage "--zone is required"
  [[ -n "$PROJECT" ]] || die_usage "--project is required"
}

# run CMD...: print the command (shell-quoted) with --dry-run, run it otherwise.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}
