#!/usr/bin/env bash
# The GPU checks of megalong in one run on a lent GPU machine, within 8 minutes:
#   1. wheels            install the carried wheels (.whl/: megatron-core, zstandard, pytest, ...) into
#                        $GPU_CHECK_SITE (default /tmp/site); PYTHONPATH=$GPU_CHECK_SITE:$PWD
#   2. tests_gpu         python -m pytest -q tests/gpu                 (junit xml: tests_gpu.xml)
#   3. attention_kernels bench/attention_kernels.py: L 8k and 32k, windows 256/1024, +-ALiBi,
#                        beside FlexAttention; causal beside SDPA
#   4. moe               bench/moe.py: 8 and 64 experts, top-1/2, 16k tokens, hidden 768/2048
#   5. train_throughput  bench/train_throughput.py: the 125M shape, batch 8 x 2048, six rows
# Each part runs under its own `timeout` (cut to what is left of the 8 minutes); a failing part does
# not stop the others. Everything goes to the output folder: <part>.log (the command on its first
# line, then what it printed: every figure), tests_gpu.xml, env.txt and summary.tsv (part, exit
# code, seconds; 124 = timed out).
#
# Usage (from anywhere; it works in the repository root):
#   bash bench/gpu_check.sh [OUT_DIR]            the real run (the output folder is $OUT when set)
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]  on a CPU: every step that can be checked without a
#                                                GPU (wheels, argument parsing with the real run's
#                                                arguments, pytest collection of tests/gpu); no
#                                                wheels or network needed (tests/test_gpu_check.py)
#   bash bench/gpu_check.sh --fetch-wheels       on a machine with network: fill .whl/ (the shared
#                                                wheels.sh, plus pytest's wheels) for the device
#   bash bench/gpu_check.sh --check-wheels       say which wheels .whl/ holds, lacks, or has for
#                                                another Python than the device's 3.12
# Environment: OUT (output folder), PYTHON (default python3), GPU_CHECK_SITE (default /tmp/site),
# GPU_CHECK_WHEELS (default .whl), GPU_CHECK_BUDGET (seconds for all parts, default 470).
# Exit code: 0 when every part exited 0, else 1; 2 for bad usage.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for all parts (8 minutes, less a margin for the summary)

# The real run's arguments: the dry run checks these very arrays.
ATTENTION_ARGS=(--only window --only causal --lengths 8192 32768 --windows 256 1024 --iters 10)
MOE_ARGS=(--experts 8 64 --top-k 1 2 --tokens 16384 --hidden 768 2048)
THROUGHPUT_ARGS=(--config configs/gpt-neo-125m.yaml --batch 8 --seq 2048 --warmup 3 --iters 10)
# Python packages the device lacks, as wheel name prefixes (pip normalises names to underscores).
NEEDED_WHEELS=(megatron_core zstandard pydantic pydantic_core annotated_types typing_inspection
               typing_extensions hjson deepspeed pytest pluggy iniconfig pygments)

# The wheels: which of NEEDED_WHEELS are in .whl/, and are they for the device's Python 3.12?
# No wheels at all: a message only (exit 0; the dry run on a CI machine). Some: exit 1 unless all
# are there and fit.
check_wheels() {
  shopt -s nullglob
  local files=("$WHEELS"/*.whl) missing=() wrong=() name f found
  shopt -u nullglob
  if ((${#files[@]} == 0)); then
    echo "wheels: none in $WHEELS. The device has no network and lacks megatron-core: run"
    echo "  bash bench/gpu_check.sh --fetch-wheels   (or bash ../shared/device/wheels.sh)"
    echo "here first and carry .whl/ along (run's carry: [\".whl\"])."
    return 0
  fi
  for name in "${NEEDED_WHEELS[@]}"; do
    found=
    for f in "${files[@]}"; do
      [[ $(basename "$f") == "$name"-[0-9]* ]] || continue
      found=1
      [[ $(basename "$f") =~ -(cp312|py3|py2\.py3)-[^-]+-[^-]+\.whl$ ]] || wrong+=("$(basename "$f")")
    done
    [[ -n $found ]] || missing+=("$name")
  done
  echo "wheels: ${#files[@]} in $WHEELS"
  ((${#missing[@]} == 0)) || echo "wheels: missing ${missing[*]} (bash bench/gpu_check.sh --fetch-wheels)"
  ((${#wrong[@]} == 0)) || echo "wheels: not for CPython 3.12: ${wrong[*]}"
  ((${#missing[@]} + ${#wrong[@]} == 0)) && echo "wheels: all ${#NEEDED_WHEELS[@]} packages present, for CPython 3.12"
}

mode=run
case "${1:-}" in
  --dry-run) mode=dry; shift ;;
  --fetch-wheels) mode=fetch; shift ;;
  --check-wheels) mode=wheels; shift ;;
  -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
  -*) echo "gpu_check.sh: unknown option $1 (--dry-run, --fetch-wheels, --check-wheels, --help)" >&2; exit 2 ;;
esac

if [[ $mode == fetch ]]; then
  # ../shared/device/wheels.sh beside the checkout, or beside the main checkout of a git worktree
  common=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null)
  shared=
  for candidate in "${GPU_CHECK_WHEELS_SH:-}" "$ROOT/../shared/device/wheels.sh" \
                   "${common:+$(dirname "$common")/../shared/device/wheels.sh}"; do
    [[ -n $candidate && -f $candidate ]] && { shared=$candidate; break; }
  done
  [[ -n $shared ]] || { echo "gpu_check.sh: ../shared/device/wheels.sh not found (set GPU_CHECK_WHEELS_SH)" >&2; exit 1; }
  # wheels.sh notes .whl/ in ./.git/info/exclude, which a git worktree (.git is a file) lacks:
  # run it from a scratch folder, and make git ignore .whl/ here through `git rev-parse`.
  scratch=$(mktemp -d) && mkdir -p "$scratch/.git/info"
  (cd "$scratch" && bash "$shared" "$WHEELS") || exit 1
  rm -rf "$scratch"
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) && mkdir -p "$(dirname "$exclude")" &&
    { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$WHEELS" pytest pluggy iniconfig pygments || exit 1
  ls -la "$WHEELS"
  exit 0
fi

if [[ $mode == wheels ]]; then
  check_wheels
  exit $?
fi

out=${OUT:-${1:-}}
if [[ -z $out ]]; then
  echo "gpu_check.sh: give an output folder (or set \$OUT)" >&2
  exit 2
fi
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
summary=$out/summary.tsv
printf 'part\texit\tseconds\tlog\n' > "$summary"
start=$SECONDS
failed=0

# part NAME TIMEOUT COMMAND...: run COMMAND under `timeout` (at most what is left of the budget),
# its output to NAME.log; one line in summary.tsv. A shell function of this script (the wheels)
# cannot run under `timeout`: it runs directly and puts its own commands under `timeout $limit`.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  ((limit > left)) && limit=$left
  local log=$out/$name.log t0=$SECONDS rc
  echo "\$ $*" > "$log"
  if ((limit < 5)); then
    echo "not run: the ${BUDGET}s budget is spent" >> "$log"
    rc=124
  else
    echo "== $name (timeout ${limit}s)"
    if declare -F "$1" > /dev/null; then
      limit=$limit "$@" >> "$log" 2>&1
    else
      timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    fi
    rc=$?
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$(basename "$log")" >> "$summary"
  ((rc == 0)) || failed=1
  return 0
}

install_wheels() {
  check_wheels || return 1
  compgen -G "$WHEELS/*.whl" > /dev/null || return 1
  timeout -k 5 "$limit" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || return 1
  PYTHONPATH=$SITE:$ROOT timeout 60 "$PY" -c "import megatron.core, pytest; print('megatron-core', megatron.core.__version__, '| pytest', pytest.__version__)"
}

environment() {
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
}

export TOKENIZERS_PARALLELISM=false
if [[ $mode == dry ]]; then
  echo "gpu_check.sh --dry-run: output in $out"
  export PYTHONPATH=$ROOT
  environment > "$out/env.txt" 2>&1
  part wheels 30 check_wheels
  part tools 10 bash -c "command -v timeout && command -v nvidia-smi || echo 'nvidia-smi: absent here (the device has it)'"
  part tests_gpu 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/gpu
  part attention_kernels 60 "$PY" bench/attention_kernels.py "${ATTENTION_ARGS[@]}" --check-args
  part moe 60 "$PY" bench/moe.py "${MOE_ARGS[@]}" --check-args
  part train_throughput 60 "$PY" bench/train_throughput.py "${THROUGHPUT_ARGS[@]}" --check-args
else
  echo "gpu_check.sh: output in $out"
  part wheels 90 install_wheels
  export PYTHONPATH=$SITE:$ROOT
  environment > "$out/env.txt" 2>&1
  part tests_gpu 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu --junitxml="$out/tests_gpu.xml"
  part attention_kernels 120 "$PY" bench/attention_kernels.py "${ATTENTION_ARGS[@]}"
  part moe 60 "$PY" bench/moe.py "${MOE_ARGS[@]}"
  part train_throughput 170 "$PY" bench/train_throughput.py "${THROUGHPUT_ARGS[@]}"
fi

echo "== summary ($((SECONDS - start)) s in all; $summary)"
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
exit $failed
