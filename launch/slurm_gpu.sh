#!/usr/bin/env bash
# Submits `t5x` as a multi-node GPU job to SLURM: one process per node (or per
# GPU), all started by srun and joined into one JAX distributed job. The job is
# requeued when it is preempted or nears its time limit; the trainer resumes
# from its last checkpoint in MODEL_DIR (which must be on a shared filesystem).
#
#   launch/slurm_gpu.sh --nodes N --gpus-per-node G [options] -- t5x-args...
#
#   launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \
#     --model-dir /shared/runs/sst2 -- train --gin_file=models/lm_adapted_base.gin \
#     --gin_file=runs/prompt_tune.gin --gin.MIXTURE_OR_TASK_NAME=\"glue_sst2\"
#
# Options:
#   --nodes N               number of nodes (required)
#   --gpus-per-node G       GPUs on each node (required)
#   --process-per-gpu       one process per GPU (N*G processes) instead of one per node
#   --partition P           SLURM partition
#   --account A             SLURM account to charge
#   --time T                time limit, e.g. 24:00:00 (default: the partition's)
#   --job-name NAME         (default: prompt-transfer)
#   --cpus-per-task C       CPUs for each process (input pipeline)
#   --shared                share the nodes (default: --exclusive and --mem=0: the whole
#                           nodes, so no process is left with one CPU or a sliver of memory)
#   --output PATH           log file (default: slurm-%x-%j.out; appended to across requeues)
#   --model-dir DIR         adds --gin.MODEL_DIR="DIR" (a shared folder)
#   --venv DIR              virtual environment activated on every node
#                           (default: the active one, $VIRTUAL_ENV)
#   --port PORT             coordinator port on the first node (default: 20000 + job id % 20000)
#   --requeue-signal SECS   requeue this long before the time limit (default: 300)
#   --max-requeues N        stop requeueing at the time limit after N restarts (default: 20)
#   --sbatch-flag FLAG      extra #SBATCH line (repeatable), e.g. --sbatch-flag=--constraint=a100
#   --script PATH           where to write the batch script (default: a temporary file)
#   --dry-run               print the batch script and the sbatch command, submit nothing
#   -h, --help              this help
# Everything after `--` is passed to `t5x` unchanged. T5X=... overrides the
# command (e.g. T5X="python -m prompt_transfer.cli"). The venv needs JAX's CUDA
# build (pip install -c constraints.txt -e . "jax[cuda12]"): every task sets
# PROMPT_TRANSFER_PLATFORM=gpu, so t5x refuses to start on a CPU-only JAX.
set -euo pipefail

PROG=slurm_gpu.sh
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die_usage() { echo "$PROG: $*" >&2; echo "Run '$0 --help' for the options." >&2; exit 2; }

NODES=""; GPUS=""; PER_GPU=0; PARTITION=""; ACCOUNT=""; TIME=""; JOB_NAME=prompt-transfer
CPUS=""; OUTPUT="slurm-%x-%j.out"; MODEL_DIR=""; VENV="${VIRTUAL_ENV:-}"; PORT=""; SHARED=0
SIGNAL_SECS=300; MAX_REQUEUES=20; SBATCH_FLAGS=(); SCRIPT=""; DRY=0; T5X_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt="$1"
  if [[ "$opt" == --*=* ]]; then set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; opt="$1"; fi
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS="$2"; shift 2 ;;
    --process-per-gpu) PER_GPU=1; shift ;;
    --partition) need_value "$@"; PARTITION="$2"; shift 2 ;;
    --account) need_value "$@"; ACCOUNT="$2"; shift 2 ;;
    --time) need_value "$@"; TIME="$2"; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME="$2"; shift 2 ;;
    --cpus-per-task) need_value "$@"; CPUS="$2"; shift 2 ;;
    --shared) SHARED=1; shift ;;
    --output) need_value "$@"; OUTPUT="$2"; shift 2 ;;
    --model-dir) need_value "$@"; MODEL_DIR="$2"; shift 2 ;;
    --venv) [[ $# -ge 2 ]] || die_usage "--venv needs a value"; VENV="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --requeue-signal) need_value "$@"; SIGNAL_SECS="$2"; shift 2 ;;
    --max-requeues) need_value "$@"; MAX_REQUEUES="$2"; shift 2 ;;
    --sbatch-flag) [[ $# -ge 2 && -n "$2" ]] || die_usage "--sbatch-flag needs a value"
      SBATCH_FLAGS+=("$2"); shift 2 ;;
    --script) need_value "$@"; SCRIPT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; T5X_ARGS=("$@"); break ;;
    *) die_usage "unknown option '$1' (t5x arguments go after --)" ;;
  esac
done

missing=()
[[ -n "$NODES" ]] || missing+=(--nodes)
[[ -n "$GPUS" ]] || missing+=(--gpus-per-node)
[[ ${#missing[@]} -eq 0 ]] || die_usage "missing required option(s): ${missing[*]}"
[[ ${#T5X_ARGS[@]} -gt 0 ]] || die_usage "nothing to run: give the t5x arguments after --, e.g. -- train --gin_file=..."
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_count "$NODES" || die_usage "--nodes must be a positive integer, got '$NODES'"
is_count "$GPUS" || die_usage "--gpus-per-node must be a positive integer, got '$GPUS'"
[[ -z "$CPUS" ]] || is_count "$CPUS" || die_usage "--cpus-per-task must be a positive integer, got '$CPUS'"
[[ -z "$PORT" ]] || is_count "$PORT" || die_usage "--port must be a port number, got '$PORT'"
is_count "$SIGNAL_SECS" || die_usage "--requeue-signal must be a number of seconds, got '$SIGNAL_SECS'"
[[ "$MAX_REQUEUES" =~ ^[0-9]+$ ]] || die_usage "--max-requeues must be a number >= 0, got '$MAX_REQUEUES'"

if [[ -n "$MODEL_DIR" ]]; then
  for a in "${T5X_ARGS[@]}"; do
    [[ "$a" != --gin.MODEL_DIR=* && "$a" != --gin.MODEL_DIR ]] || \
      die_usage "give MODEL_DIR once: --model-dir or --gin.MODEL_DIR, not both"
  done
  T5X_ARGS+=("--gin.MODEL_DIR=\"$MODEL_DIR\"")
fi
# The command words: T5X (split like local.sh does) or `t5x`.
read -r -a T5X_CMD <<< "${T5X:-t5x}"
TASKS_PER_NODE=1; [[ $PER_GPU -eq 1 ]] && TASKS_PER_NODE=$GPUS

quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; printf '%s' "${out% }"; }

# ---------------------------------------------------------------------------
# The batch script.
# ---------------------------------------------------------------------------
batch_script() {
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS"
  [[ -z "$CPUS" ]] || echo "#SBATCH --cpus-per-task=$CPUS"
  if [[ $SHARED -eq 0 ]]; then echo "#SBATCH --exclusive"; echo "#SBATCH --mem=0"; fi
  [[ -z "$PARTITION" ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z "$ACCOUNT" ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z "$TIME" ]] || echo "#SBATCH --time=$TIME"
  echo "#SBATCH --output=$OUTPUT"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --chdir=$PWD"
  echo "#SBATCH --requeue"
  echo "#SBATCH --signal=B:USR1@$SIGNAL_SECS"
  local f
  for f in ${SBATCH_FLAGS[@]+"${SBATCH_FLAGS[@]}"}; do echo "#SBATCH $f"; done
  cat <<'EOF'
# Generated by launch/slurm_gpu.sh. On preemption SLURM sends SIGTERM to the
# tasks (each writes a checkpoint at one agreed step) and requeues the job
# (--requeue); near the time limit SLURM sends USR1 to this script (--signal),
# which passes it to the tasks (the same checkpoint) and requeues the job.
# Either way the trainer resumes from MODEL_DIR at the step it stopped.
set -eu
EOF
  [[ -z "$VENV" ]] || echo "source $(printf '%q' "$VENV/bin/activate")"
  echo "MAX_REQUEUES=$MAX_REQUEUES"
  echo "CMD=($(quote "${T5X_CMD[@]}" "${T5X_ARGS[@]}"))"
  if [[ -n "$PORT" ]]; then echo "PORT=$PORT"; else echo 'PORT=$((20000 + SLURM_JOB_ID % 20000))'; fi
  cat <<'EOF'
export PYTHONUNBUFFERED=1
export PROMPT_TRANSFER_PLATFORM=gpu
# srun does not pass --cpus-per-task on to the step by itself (Slurm >= 22.05).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# Process 0 runs on the first node of the allocation and hosts the coordinator.
COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export COORDINATOR_ADDRESS="$COORDINATOR_HOST:$PORT"
echo "job $SLURM_JOB_ID, start $(( ${SLURM_RESTART_COUNT:-0} + 1 )): ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NUM_NODES:-?} nodes, coordinator $COORDINATOR_ADDRESS"

# Near the time limit: USR1 goes on to every task (srun forwards it), the
# trainer writes a checkpoint at a step all processes agree on and exits 75;
# then the job is requeued and resumes from exactly that step.
SRUN_PID=
TIME_LIMIT_NEAR=0
on_usr1() {
  echo "time limit near: asking the trainer to checkpoint and stop"
  TIME_LIMIT_NEAR=1
  [ -z "$SRUN_PID" ] || kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
trap on_usr1 USR1
requeue() {
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "$1: requeueing job $SLURM_JOB_ID (it resumes from its checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed"
  else
    echo "$1: already requeued $MAX_REQUEUES times, not requeueing"
  fi
}

EOF
  # One task per srun process; SLURM_PROCID is only known inside the task, so
  # the flags are added there (bash -c, arguments passed through "$@").
  if [[ $PER_GPU -eq 1 ]]; then
    echo '# One process per GPU: process i on a node uses GPU $SLURM_LOCALID, or the one GPU'
    echo '# it sees where the site binds one GPU per task (CUDA_VISIBLE_DEVICES of length 1).'
    echo "TASK='if [ \"\$(printf %s \"\${CUDA_VISIBLE_DEVICES:-}\" | tr , \"\\\\n\" | grep -c .)\" = 1 ]; then export JAX_LOCAL_DEVICE_IDS=0; else export JAX_LOCAL_DEVICE_IDS=\$SLURM_LOCALID; fi; exec \"\$@\" --coordinator_address=\"\$COORDINATOR_ADDRESS\" --process_count=\"\$SLURM_NTASKS\" --process_index=\"\$SLURM_PROCID\" --multiprocess_gpu'"
  else
    echo '# One process per node using all its GPUs. JAX restricts a process to GPU'
    echo '# $SLURM_LOCALID when it detects Slurm (SLURM_LOCALID set): hide it.'
    echo "TASK='unset SLURM_LOCALID; exec \"\$@\" --coordinator_address=\"\$COORDINATOR_ADDRESS\" --process_count=\"\$SLURM_NTASKS\" --process_index=\"\$SLURM_PROCID\" --multiprocess_gpu'"
  fi
  cat <<'EOF'
srun --kill-on-bad-exit=1 bash -c "$TASK" t5x-task "${CMD[@]}" &
SRUN_PID=$!
# `wait` returns early when USR1 arrives: wait again until srun has exited.
set +e
while :; do
  wait "$SRUN_PID"; status=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
# 75: the trainer checkpointed on a signal (time limit, or a preemption SLURM
# did not requeue itself).
if [ "$status" -eq 75 ] || [ "$TIME_LIMIT_NEAR" -eq 1 ]; then
  requeue "$([ "$TIME_LIMIT_NEAR" -eq 1 ] && echo 'time limit near' || echo 'preempted')"
  exit 0
fi
exit "$status"
EOF
}

if [[ $DRY -eq 1 ]]; then
  shown="${SCRIPT:-${TMPDIR:-/tmp}/slurm_gpu.XXXXXX}"
  echo "# ---- batch script ($shown) ----"
  batch_script
  echo "# ---- end of batch script ----"
  if [[ -n "$SCRIPT" ]]; then quote sbatch "$SCRIPT"; echo; else echo "sbatch $shown"; fi
  exit 0
fi

command -v sbatch >/dev/null || { echo "$PROG: sbatch not found: run this on a SLURM login node" >&2; exit 1; }
[[ -n "$SCRIPT" ]] || SCRIPT=$(mktemp "${TMPDIR:-/tmp}/slurm_gpu.XXXXXX")
batch_script > "$SCRIPT"
echo "[$PROG] batch script: $SCRIPT" >&2
echo "[$PROG] + $(quote sbatch "$SCRIPT")" >&2
sbatch "$SCRIPT"
