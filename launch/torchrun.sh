#!/usr/bin/env bash
# Train on one node with N processes (one per GPU, or N CPU processes with gloo).
#
#   launch/torchrun.sh [--nproc N] [--dry-run] CONFIG.yaml [MORE.yaml ...] [--set KEY=VALUE ...]
#
# N defaults to the number of visible GPUs (1 without any). Everything after the options is passed
# to `megalong train`. --dry-run prints the resolved command and exits.
set -euo pipefail

nproc=""
dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--nproc-per-node) nproc="${2:?--nproc needs a number}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ ${#args[@]} -eq 0 ]]; then
  echo "launch/torchrun.sh: no config given (usage: launch/torchrun.sh [--nproc N] CONFIG.yaml ...)" >&2
  exit 2
fi
if [[ -z "$nproc" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L 2>/dev/null | wc -l)
  fi
  [[ -z "$nproc" || "$nproc" -lt 1 ]] && nproc=1
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/torchrun.sh: --nproc must be a positive integer, got '$nproc'" >&2
  exit 2
fi
for a in "${args[@]}"; do
  if [[ "$a" == *.yaml || "$a" == *.yml ]] && [[ ! -f "$a" ]]; then
    echo "launch/torchrun.sh: config file not found: $a" >&2
    exit 2
  fi
done

cmd=("${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$nproc"
     -m megalong.cli train "${args[@]}")
echo "${cmd[*]}"
[[ $dry_run -eq 1 ]] && exit 0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${cmd[@]}"
