#!/usr/bin/env bash
# Train with DeepSpeed's launcher (ZeRO; train.engine: deepspeed is set for you) on the hosts of a
# hostfile, or on this node alone.
#
#   launch/deepspeed.sh [--hostfile FILE] [--num-gpus N] [--master-addr HOST] [--master-port PORT]
#                       [--zero-stage 1|2|3] [--dry-run] CONFIG.yaml [MORE.yaml ...] [--set KEY=VALUE ...]
#
# FILE lists one host per line as `hostname slots=N` (see launch/hostfile.example); DeepSpeed's
# launcher reaches every host by passwordless ssh (pdsh) and starts N processes there. Without a
# hostfile, N processes start on this node (--num-gpus, default: the visible GPUs, 1 without any).
# --zero-stage sets deepspeed.zero_stage. The config is validated once for all the processes
# (python -m megalong.preflight) before the launcher starts. --dry-run validates, prints the
# resolved command and exits.
set -euo pipefail

die() { echo "megalong: launch error: launch/deepspeed.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

hostfile="" num_gpus="" master_addr="" master_port=29500 zero="" dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) need "$@"; hostfile="$2"; shift 2 ;;
    --num-gpus) need "$@"; num_gpus="$2"; shift 2 ;;
    --master-addr) need "$@"; master_addr="$2"; shift 2 ;;
    --master-port) need "$@"; master_port="$2"; shift 2 ;;
    --zero-stage) need "$@"; zero="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

[[ ${#args[@]} -gt 0 ]] || die "no config given (usage: launch/deepspeed.sh [--hostfile FILE] CONFIG.yaml ...)"
for a in "${args[@]}"; do
  if [[ "$a" == *.yaml || "$a" == *.yml ]] && [[ ! -f "$a" ]]; then
    die "config file not found: $a"
  fi
done
[[ "$master_port" =~ ^[0-9]+$ && "$master_port" -ge 1 && "$master_port" -le 65535 ]] \
  || die "--master-port must be 1..65535, got '$master_port'"
if [[ -n "$zero" ]]; then
  [[ "$zero" =~ ^[123]$ ]] || die "--zero-stage must be 1, 2 or 3, got '$zero'"
  args+=(--set "deepspeed.zero_stage=$zero")
fi

cmd=("${DEEPSPEED:-deepspeed}")
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || die "hostfile not found: $hostfile"
  [[ -z "$num_gpus" ]] || die "--num-gpus and --hostfile exclude each other (slots=N in the hostfile)"
  n=0 world=0
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    line=${line%%#*}
    [[ -z "${line//[[:space:]]/}" ]] && continue
    [[ "$line" =~ ^[[:space:]]*[A-Za-z0-9._-]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]] \
      || die "$hostfile:$n: expected 'hostname slots=N', got '$line'"
    [[ -z "$master_addr" ]] && master_addr=$(echo "$line" | awk '{print $1}')
    world=$((world + ${line##*slots=}))
  done < "$hostfile"
  [[ -n "$master_addr" ]] || die "$hostfile: no hosts"
  cmd+=(--hostfile "$hostfile" --master_addr "$master_addr")
else
  if [[ -z "$num_gpus" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then num_gpus=$(nvidia-smi -L 2>/dev/null | wc -l); fi
    [[ -z "$num_gpus" || "$num_gpus" -lt 1 ]] && num_gpus=1
  fi
  [[ "$num_gpus" =~ ^[1-9][0-9]*$ ]] || die "--num-gpus must be a positive integer, got '$num_gpus'"
  cmd+=(--num_gpus "$num_gpus")
  world=$num_gpus
  [[ -n "$master_addr" ]] && cmd+=(--master_addr "$master_addr")
fi
cmd+=(--master_port "$master_port" --no_local_rank --module megalong.cli train "${args[@]}" --set train.engine=deepspeed)
"${PYTHON:-python}" -m megalong.preflight --world-size "$world" "${args[@]}" --set train.engine=deepspeed >/dev/null || exit 2
echo "${cmd[*]}"
[[ $dry_run -eq 1 ]] && exit 0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${cmd[@]}"
