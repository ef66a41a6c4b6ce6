#!/usr/bin/env bash
# Train with torchrun: N processes per node (one per GPU, or N CPU processes with gloo), on one node
# or on several.
#
#   launch/torchrun.sh [--nproc N] [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]
#                      [--dry-run] CONFIG.yaml [MORE.yaml ...] [--set KEY=VALUE ...]
#
# N defaults to the number of visible GPUs (1 without any). With --nnodes > 1, start this script
# once on every node with the same --nnodes and --rdzv-endpoint (HOST: the node of rank 0, reachable
# from all; PORT: a free port there) and each node's own --node-rank 0..M-1. Everything else is
# passed to `megalong train`; with train.load: auto, a job started again after a failure resumes
# from its newest complete checkpoint.
# Before torchrun starts, the config is validated once for the N x M processes, with its tokenizer,
# datasets and output directories (python -m megalong.preflight): an error is one line, not a
# traceback per process. --dry-run validates, prints the resolved command and exits.
set -euo pipefail

die() { echo "megalong: launch error: launch/torchrun.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

nproc="" nnodes=1 node_rank="" endpoint="" dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--nproc-per-node) need "$@"; nproc="$2"; shift 2 ;;
    --nnodes) need "$@"; nnodes="$2"; shift 2 ;;
    --node-rank) need "$@"; node_rank="$2"; shift 2 ;;
    --rdzv-endpoint) need "$@"; endpoint="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

[[ ${#args[@]} -gt 0 ]] || die "no config given (usage: launch/torchrun.sh [--nproc N] CONFIG.yaml ...)"
if [[ -z "$nproc" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L 2>/dev/null | wc -l)
  fi
  [[ -z "$nproc" || "$nproc" -lt 1 ]] && nproc=1
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$nnodes'"
for a in "${args[@]}"; do
  if [[ "$a" == *.yaml || "$a" == *.yml ]] && [[ ! -f "$a" ]]; then
    die "config file not found: $a"
  fi
done

cmd=("${PYTHON:-python}" -m torch.distributed.run)
if [[ "$nnodes" -eq 1 ]]; then
  [[ -z "$node_rank" && -z "$endpoint" ]] || die "--node-rank and --rdzv-endpoint need --nnodes > 1"
  cmd+=(--standalone)
else
  [[ -n "$node_rank" ]] || die "--nnodes $nnodes needs --node-rank (0..$((nnodes - 1)))"
  [[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] \
    || die "--node-rank must be an integer in 0..$((nnodes - 1)), got '$node_rank'"
  [[ -n "$endpoint" ]] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the node of rank 0)"
  [[ "$endpoint" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--rdzv-endpoint must be HOST:PORT, got '$endpoint'"
  port="${endpoint##*:}"
  [[ "$port" -ge 1 && "$port" -le 65535 ]] || die "--rdzv-endpoint port must be 1..65535, got '$port'"
  # Static rendezvous: node R's processes get global ranks R*N .. R*N+N-1, in node order.
  cmd+=(--nnodes "$nnodes" --node_rank "$node_rank" --rdzv_backend static --rdzv_endpoint "$endpoint")
fi
cmd+=(--nproc_per_node "$nproc")
cmd+=(-m megalong.cli train "${args[@]}")
# Once per job: launch/slurm.sbatch has validated the config already when it sets this.
if [[ -z "${MEGALONG_PREFLIGHT_DONE:-}" ]]; then
  "${PYTHON:-python}" -m megalong.preflight --world-size "$((nproc * nnodes))" "${args[@]}" >/dev/null || exit 2
fi
echo "${cmd[*]}"
[[ $dry_run -eq 1 ]] && exit 0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${cmd[@]}"
