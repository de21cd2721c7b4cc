#!/usr/bin/env bash
# Runs N `t5x` processes on this machine as one JAX distributed job (what the
# multi-process tests use; also handy to try multi-host code on a laptop).
#
#   launch/local.sh N [--dry-run] [--port P] -- t5x-args...
#   launch/local.sh 2 -- train --gin_file=runs/quickstart.gin --gin.MODEL_DIR=\"/tmp/r\"
#
# Process i gets --coordinator_address=localhost:P --process_count=N
# --process_index=i. CPU processes talk through gloo collectives. Exits non-zero
# if any process fails (75: preempted, checkpointed; rerun to resume); Ctrl-C or
# a failure stops them all.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
N="$1"; shift
DRY=0; PORT="${PORT:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --port) PORT="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "local.sh: N must be a positive integer, got '$N'" >&2; exit 2; fi
if [[ -z "$PORT" ]]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
T5X="${T5X:-t5x}"

cmds=()
for ((i = 0; i < N; i++)); do
  # Shell-quoted, so the printed line runs as is (gin values with spaces and
  # quotes included); $T5X is split into words as when it runs below.
  cmd=$(printf '%q ' $T5X "$@" "--coordinator_address=localhost:$PORT" "--process_count=$N" \
        "--process_index=$i")
  cmds+=("${cmd% }")
done
if [[ $DRY -eq 1 ]]; then printf '%s\n' "${cmds[@]}"; exit 0; fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
# Ctrl-C stops every process; SIGTERM (a preemption) is passed on, and the
# processes checkpoint at one agreed step and exit 75, which this script
# returns too (run it again to resume).
trap cleanup INT
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done' TERM
# On a GPU host, split the GPUs between the processes (each would otherwise
# grab all of them): G GPUs, N processes -> G/N consecutive GPUs each.
GPUS=0
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
for ((i = 0; i < N; i++)); do
  if [[ $GPUS -ge $N && $((GPUS % N)) -eq 0 ]]; then
    per=$((GPUS / N)); ids=$(seq -s, $((i * per)) $((i * per + per - 1)))
    CUDA_VISIBLE_DEVICES="$ids" $T5X "$@" --coordinator_address="localhost:$PORT" \
      --process_count="$N" --process_index="$i" &
  else
    $T5X "$@" --coordinator_address="localhost:$PORT" --process_count="$N" --process_index="$i" &
  fi
  pids+=($!)
done
set +e
status=0
for p in "${pids[@]}"; do
  while :; do  # a trapped signal ends `wait` early: wait again until the process is gone
    wait "$p"; rc=$?
    kill -0 "$p" 2>/dev/null || break
  done
  if [[ $rc -eq 75 ]]; then
    [[ $status -ne 0 ]] || status=75
  elif [[ $rc -ne 0 ]]; then
    status=1; cleanup
  fi
done
exit $status
