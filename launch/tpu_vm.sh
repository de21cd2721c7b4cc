#!/usr/bin/env bash
# Runs `t5x` on a Cloud TPU VM or pod slice: creates it (or reuses it), installs
# this package on every worker, runs the command on all workers, and on spot /
# preemptible capacity recreates the VM and reruns the same command after a
# preemption (the trainer resumes from its last checkpoint in MODEL_DIR).
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE [options] -- t5x-args...
#
#   launch/tpu_vm.sh --name pt-v4 --zone us-central2-b --accelerator-type v4-8 --spot \
#     --model-dir gs://my-bucket/runs/sst2 -- train --gin_file=runs/prompt_tune.gin \
#     --gin_file=models/lm_adapted_base.gin --gin.MIXTURE_OR_TASK_NAME=\"glue_sst2\"
#
# Options:
#   --name NAME              TPU VM name (required)
#   --zone ZONE              e.g. us-central2-b, europe-west4-a (required)
#   --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 (required)
#   --version RUNTIME        TPU software version (default from TYPE: tpu-ubuntu2204-base for
#                            v2/v3/v4, v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)
#   --project PROJECT        Google Cloud project (default: gcloud's configured project)
#   --spot | --preemptible   cheaper capacity that can be taken back at any time; --spot
#                            asks through a queued resource (waits for capacity instead
#                            of failing; deleted with the node), --no-queued: a plain create
#   --no-queued              --spot with `tpu-vm create --spot` instead of a queued resource
#   --reuse                  use the VM if it already exists (READY); create it otherwise
#   --repo PATH|GIT_URL      the package to install (default: this checkout, copied with
#                            `gcloud compute tpus tpu-vm scp --recurse --worker=all`);
#                            a git URL is cloned on every worker instead
#   --git-ref REF            branch or tag to clone with a git URL --repo
#   --jax SPEC               JAX to install on the workers (default: jax[tpu])
#   --model-dir DIR          adds --gin.MODEL_DIR; give a gs://BUCKET/PATH: every worker
#                            writes it directly (the trainer speaks gs://), all workers share
#                            it and it outlives the VM (needed to resume after a preemption)
#   --gcsfuse                mount the --model-dir bucket with gcsfuse at /mnt/gcs/BUCKET
#                            instead (not recommended: a rename there is copy-then-delete, so
#                            checkpoint commits are not atomic)
#   --internal-ip            ssh/scp to the workers' internal IPs (projects without external IPs)
#   --max-restarts N         recreate/rerun at most N times after a failure (default: 5)
#   --capacity-retries N     retry a create that fails for lack of capacity N times (default:
#                            10, --retry-wait apart); these do not count as restarts
#   --retry-wait SECONDS     pause before each restart (default: 60)
#   --create-flag FLAG       extra flag for `gcloud compute tpus tpu-vm create` (repeatable),
#                            e.g. --create-flag=--service-account=SA --create-flag=--network=N
#   --delete-when-done       delete the VM when the script ends, also after a failure (a
#                            stopped run does not keep a billed VM)
#   --dry-run                print every command, run nothing
#   -h, --help               this help
# Everything after `--` is passed to `t5x` unchanged (quoted for the remote shell).
set -euo pipefail

PROG=tpu_vm.sh
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die_usage() { echo "$PROG: $*" >&2; echo "Run '$0 --help' for the options." >&2; exit 2; }
log() { echo "[$PROG] $*" >&2; }

NAME=""; ZONE=""; ACCEL=""; VERSION=""; PROJECT=""; CAPACITY=""; REUSE=0; REPO=""; GIT_REF=""
CREATE_FLAGS=(); JAX_SPEC="jax[tpu]"; MODEL_DIR=""; MAX_RESTARTS=5; RETRY_WAIT=60; DELETE_WHEN_DONE=0; DRY=0
GCSFUSE=0; INTERNAL_IP=0; CAPACITY_RETRIES=10; NO_QUEUED=0
POLL="${TPU_VM_POLL_SECONDS:-30}"   # queued-resource state polling
T5X_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt="$1"; val=""
  if [[ "$opt" == --*=* ]]; then val="${opt#*=}"; opt="${opt%%=*}"; set -- "$opt" "$val" "${@:2}"; fi
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --spot|--preemptible)
      [[ -z "$CAPACITY" || "$CAPACITY" == "$opt" ]] || die_usage "give --spot or --preemptible, not both"
      CAPACITY="$opt"; shift ;;
    --reuse) REUSE=1; shift ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --git-ref) need_value "$@"; GIT_REF="$2"; shift 2 ;;
    --jax) need_value "$@"; JAX_SPEC="$2"; shift 2 ;;
    --model-dir) need_value "$@"; MODEL_DIR="$2"; shift 2 ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS="$2"; shift 2 ;;
    --retry-wait) need_value "$@"; RETRY_WAIT="$2"; shift 2 ;;
    --create-flag) [[ $# -ge 2 && -n "$2" ]] || die_usage "--create-flag needs a value"
      CREATE_FLAGS+=("$2"); shift 2 ;;
    --delete-when-done) DELETE_WHEN_DONE=1; shift ;;
    --gcsfuse) GCSFUSE=1; shift ;;
    --no-queued) NO_QUEUED=1; shift ;;
    --capacity-retries) need_value "$@"; CAPACITY_RETRIES="$2"; shift 2 ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; T5X_ARGS=("$@"); break ;;
    *) die_usage "unknown option '$1' (t5x arguments go after --)" ;;
  esac
done

missing=()
[[ -n "$NAME" ]] || missing+=(--name)
[[ -n "$ZONE" ]] || missing+=(--zone)
[[ -n "$ACCEL" ]] || missing+=(--accelerator-type)
[[ ${#missing[@]} -eq 0 ]] || die_usage "missing required option(s): ${missing[*]}"
[[ ${#T5X_ARGS[@]} -gt 0 ]] || die_usage "nothing to run: give the t5x arguments after --, e.g. -- train --gin_file=..."
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die_usage "--max-restarts must be a number >= 0, got '$MAX_RESTARTS'"
[[ "$CAPACITY_RETRIES" =~ ^[0-9]+$ ]] || die_usage "--capacity-retries must be a number >= 0, got '$CAPACITY_RETRIES'"
[[ "$RETRY_WAIT" =~ ^[0-9]+$ ]] || die_usage "--retry-wait must be a number of seconds, got '$RETRY_WAIT'"
[[ -z "$GIT_REF" || -n "$REPO" ]] || die_usage "--git-ref needs a git URL --repo"

case "$ACCEL" in
  v5e-*) die_usage "'$ACCEL' is not a Cloud TPU accelerator type: v5e slices are v5litepod-N (e.g. v5litepod-8)" ;;
esac
if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v2-*|v3-*|v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die_usage "no default --version for accelerator type '$ACCEL': give --version" ;;
  esac
fi

# Where the package comes from: a git URL is cloned on the workers, anything
# else is a local folder copied to them.
REMOTE_DIR=prompt-transfer            # relative to the remote home folder
IS_GIT=0
case "$REPO" in
  http://*|https://*|git://*|ssh://*|git@*|*.git) IS_GIT=1 ;;
esac
if [[ $IS_GIT -eq 0 ]]; then
  [[ -n "$GIT_REF" ]] && die_usage "--git-ref needs a git URL --repo"
  if [[ -z "$REPO" ]]; then REPO="$(cd "$(dirname "$0")/.." && pwd)"; fi
  [[ -f "$REPO/setup.py" || -f "$REPO/pyproject.toml" ]] || \
    die_usage "--repo $REPO is neither a git URL nor a folder with setup.py"
  REPO="$(cd "$REPO" && pwd)"
fi

# MODEL_DIR: given with --model-dir (a gs:// one is mounted) or inside the t5x args.
has_model_dir_arg=0
for a in "${T5X_ARGS[@]}"; do
  case "$a" in
    --gin.MODEL_DIR=*|--gin.MODEL_DIR)
      has_model_dir_arg=1 ;;
  esac
done
[[ -z "$MODEL_DIR" || $has_model_dir_arg -eq 0 ]] || \
  die_usage "give MODEL_DIR once: --model-dir or --gin.MODEL_DIR, not both"
GCS_BUCKET=""; MOUNT_POINT=""
if [[ -n "$MODEL_DIR" ]]; then
  if [[ "$MODEL_DIR" == gs://* && $GCSFUSE -eq 0 ]]; then
    T5X_ARGS+=("--gin.MODEL_DIR=\"$MODEL_DIR\"")   # written natively (orbax, epath)
  elif [[ "$MODEL_DIR" == gs://* ]]; then
    rest="${MODEL_DIR#gs://}"; GCS_BUCKET="${rest%%/*}"
    [[ -n "$GCS_BUCKET" ]] || die_usage "--model-dir $MODEL_DIR has no bucket"
    MOUNT_POINT="/mnt/gcs/$GCS_BUCKET"
    sub=""; [[ "$rest" == */* ]] && sub="/${rest#*/}"
    T5X_ARGS+=("--gin.MODEL_DIR=\"$MOUNT_POINT${sub%/}\"")
  else
    log "warning: --model-dir $MODEL_DIR is on the VM's own disk: not shared by the workers" \
        "of a multi-host slice and lost when the VM is recreated; use gs://BUCKET/PATH"
    T5X_ARGS+=("--gin.MODEL_DIR=\"$MODEL_DIR\"")
  fi
elif [[ $has_model_dir_arg -eq 0 ]]; then
  log "warning: no MODEL_DIR given (--model-dir gs://...): a restarted run cannot resume"
fi
[[ $GCSFUSE -eq 0 || -n "$GCS_BUCKET" ]] || die_usage "--gcsfuse needs a gs:// --model-dir"

# ---------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; printf '%s' "${out% }"; }
# run CMD...: print it (--dry-run) or run it.
run() {
  if [[ $DRY -eq 1 ]]; then quote "$@"; echo; return 0; fi
  log "+ $(quote "$@")"
  "$@"
}
PROJECT_FLAG=(); [[ -n "$PROJECT" ]] && PROJECT_FLAG=("--project=$PROJECT")
tpu() { run gcloud compute tpus tpu-vm "$1" "$NAME" "--zone=$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} "${@:2}"; }
# Every ssh: a VM that is gone (preempted) fails in 30 s, not after minutes of retries.
SSH_OPTS=(--ssh-flag=-oConnectTimeout=30); SCP_OPTS=()
if [[ $INTERNAL_IP -eq 1 ]]; then SSH_OPTS+=(--internal-ip); SCP_OPTS+=(--internal-ip); fi
ssh_all() { tpu ssh --worker=all "${SSH_OPTS[@]}" "$@"; }

# The VM's state (READY, CREATING, PREEMPTED, TERMINATED, ...) or MISSING.
vm_state() {
  local s
  if s=$(gcloud compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
         ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} '--format=value(state)' 2>/dev/null); then
    echo "${s:-UNKNOWN}"
  else
    echo MISSING
  fi
}

QUEUED=0; [[ "$CAPACITY" == --spot && $NO_QUEUED -eq 0 ]] && QUEUED=1
qr() { run gcloud compute tpus queued-resources "$1" "$NAME" "--zone=$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} "${@:2}"; }
# Spot capacity through a queued resource: the request waits in the zone's
# queue until capacity frees up, then the node (named NAME) is created.
create_queued() {
  qr create "--node-id=$NAME" "--accelerator-type=$ACCEL" "--runtime-version=$VERSION" --spot \
    ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"} || return
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "--zone=$ZONE"
                  ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} '--format=value(state.state)')
  if [[ $DRY -eq 1 ]]; then
    quote "${describe[@]}"; echo; echo "# repeated every ${POLL}s until ACTIVE (FAILED or SUSPENDED: stop)"
    return 0
  fi
  local state waited=0
  while :; do
    state=$("${describe[@]}" 2>/dev/null || echo UNKNOWN)
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED) log "queued resource $NAME is $state"; return 1 ;;
    esac
    (( waited % 600 == 0 )) && log "queued resource $NAME: ${state:-?} (waiting for capacity)"
    sleep "$POLL"; waited=$((waited + POLL))
  done
}

# A zone out of capacity (common for spot) is retried, --retry-wait apart,
# without using up the restarts that preemptions need.
create_vm() {
  if [[ $QUEUED -eq 1 ]]; then create_queued; return; fi
  local extra=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}); [[ -n "$CAPACITY" ]] && extra+=("$CAPACITY")
  local tries=0 rc err
  while :; do
    rc=0; err=$(mktemp)
    tpu create "--accelerator-type=$ACCEL" "--version=$VERSION" ${extra[@]+"${extra[@]}"} \
      2>"$err" || rc=$?
    cat "$err" >&2
    if [[ $rc -ne 0 ]] && grep -qiE 'capacity|RESOURCE_EXHAUSTED|resources? (are|is) unavailable|stockout' "$err" \
        && [[ $tries -lt $CAPACITY_RETRIES ]]; then
      rm -f "$err"; tries=$((tries + 1))
      log "no capacity for $ACCEL in $ZONE: create retry $tries/$CAPACITY_RETRIES in ${RETRY_WAIT}s"
      [[ "$(vm_state)" == MISSING ]] || delete_vm || true   # a half-created VM
      sleep "$RETRY_WAIT"
      continue
    fi
    rm -f "$err"
    return $rc
  done
}
# --force: the queued resource goes with its node.
delete_vm() { if [[ $QUEUED -eq 1 ]]; then qr delete --force --quiet; else tpu delete --quiet; fi; }

# Remote shell snippets (they run in the remote home folder, on every worker).
Q_REMOTE_DIR=$(printf '%q' "$REMOTE_DIR")
INSTALL="set -e"
if [[ $IS_GIT -eq 1 ]]; then
  clone=(git clone --depth 1); [[ -n "$GIT_REF" ]] && clone+=(--branch "$GIT_REF")
  INSTALL+="; rm -rf $Q_REMOTE_DIR; $(quote "${clone[@]}" "$REPO" "$REMOTE_DIR")"
fi
if [[ -n "$GCS_BUCKET" ]]; then
  # gcsfuse from Google's apt repository (Cloud TPU images do not ship it).
  INSTALL+='; if ! command -v gcsfuse >/dev/null; then'
  INSTALL+=' curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;'
  INSTALL+=' echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;'
  INSTALL+=' sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi'
fi
# TPU VM images have Python 3.10, where current JAX does not install: uv (a
# maintained installer) brings Python 3.11 and a venv; constraints.txt pins
# the versions the test suite passed with (jax[tpu] then picks its libtpu).
VENV_DIR=prompt-transfer-venv         # relative to the remote home folder
INSTALL+='; if [ ! -x "$HOME/.local/bin/uv" ]; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi'
INSTALL+="; \$HOME/.local/bin/uv venv --allow-existing --python 3.11 $VENV_DIR"
INSTALL+="; \$HOME/.local/bin/uv pip install --python $VENV_DIR/bin/python -c ./$Q_REMOTE_DIR/constraints.txt"
INSTALL+=" $(quote "$JAX_SPEC") -f https://storage.googleapis.com/jax-releases/libtpu_releases.html -e ./$Q_REMOTE_DIR"

RUN=""
if [[ -n "$GCS_BUCKET" ]]; then
  # Mounted before each run: idempotent, and a rerun after an ssh failure may
  # find gcsfuse gone. Directory renames (checkpoint commits) need --rename-dir-limit.
  qm=$(printf '%q' "$MOUNT_POINT"); qb=$(printf '%q' "$GCS_BUCKET")
  RUN+="if ! mountpoint -q $qm; then sudo mkdir -p $qm && sudo chown \"\$(id -u):\$(id -g)\" $qm"
  RUN+=" && gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 $qb $qm || exit 1; fi; "
fi
# jax.distributed.initialize() is started by our CLI when TPU_WORKER_ID is set;
# GCE TPU VMs keep the worker number in the instance metadata.
RUN+='if [ -z "${TPU_WORKER_ID:-}" ]; then w=$(curl -sf -H Metadata-Flavor:Google'
RUN+=' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
RUN+=' && export TPU_WORKER_ID="$w"; fi; '
# PROMPT_TRANSFER_PLATFORM: t5x refuses to start on another JAX backend (a
# CPU-only jax would otherwise train on the host's CPU without a word).
RUN+="cd $Q_REMOTE_DIR && export PATH=\"\$HOME/$VENV_DIR/bin:\$HOME/.local/bin:\$PATH\""
RUN+=" PROMPT_TRANSFER_PLATFORM=tpu && echo \$\$ > .t5x.pid"
RUN+=" && exec $(quote t5x "${T5X_ARGS[@]}")"
# Before a rerun on a VM that stayed READY: stop what the last run left behind
# (an ssh failure does not stop the remote processes).
STOP="p=\$(cat $Q_REMOTE_DIR/.t5x.pid 2>/dev/null); if [ -n \"\$p\" ] && tr '\\0' ' ' < /proc/\$p/cmdline 2>/dev/null | grep -q t5x; then kill \$p && sleep 10; fi; rm -f $Q_REMOTE_DIR/.t5x.pid"

STAGE_ROOT="${TMPDIR:-/tmp}/tpu_vm-$NAME-$$"
STAGE="$STAGE_ROOT/$REMOTE_DIR"
if [[ -d "$REPO/.git" || -f "$REPO/.git" ]]; then
  # Tracked and untracked-but-not-ignored files: no .venv, runs or caches.
  STAGE_CMD="mkdir -p $(printf '%q' "$STAGE") && (cd $(printf '%q' "$REPO") && git ls-files -co --exclude-standard"
  STAGE_CMD+=" | while IFS= read -r f; do [ ! -e \"\$f\" ] || printf '%s\\n' \"\$f\"; done | tar -cf - -T -)"
  STAGE_CMD+=" | tar -xf - -C $(printf '%q' "$STAGE")"
else
  STAGE_CMD="mkdir -p $(printf '%q' "$STAGE") && tar -C $(printf '%q' "$REPO") --exclude=.git --exclude=.venv"
  STAGE_CMD+=" --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C $(printf '%q' "$STAGE")"
fi

install_package() {
  if [[ $IS_GIT -eq 0 ]]; then
    if [[ $DRY -eq 1 ]]; then echo "$STAGE_CMD"; else log "+ $STAGE_CMD"; rm -rf "$STAGE_ROOT"; bash -c "$STAGE_CMD"; fi
    run gcloud compute tpus tpu-vm scp --recurse --worker=all "$STAGE" "$NAME:" "--zone=$ZONE" \
      ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} ${SCP_OPTS[@]+"${SCP_OPTS[@]}"} || return
  fi
  [[ $DRY -eq 0 ]] || echo "# on every worker: $INSTALL"
  ssh_all "--command=$INSTALL"
}
run_t5x() {
  [[ $DRY -eq 0 ]] || echo "# on every worker: $RUN"
  ssh_all --ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5 "--command=$RUN"
}
stop_leftovers() { ssh_all "--command=$STOP"; }

cleanup() { [[ $DRY -eq 1 ]] || rm -rf "$STAGE_ROOT"; }
trap cleanup EXIT
trap 'log "interrupted: the run may still be going on $NAME; stop it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE"; exit 130' INT TERM

# ---------------------------------------------------------------------------
# Create (or reuse), install, run; after a failure recreate or rerun.
# ---------------------------------------------------------------------------
need_create=1; need_delete=0; need_install=1
if [[ $REUSE -eq 1 ]]; then
  if [[ $DRY -eq 1 ]]; then
    echo "$(quote gcloud compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} '--format=value(state)')"
    echo "# --reuse: if that prints READY the VM is used as it is; otherwise it is (deleted and) created:"
  else
    state=$(vm_state); log "--reuse: $NAME is $state"
    case "$state" in
      READY) need_create=0 ;;
      MISSING) ;;
      *) need_delete=1 ;;
    esac
  fi
fi

# Stopping for good after a failure: with --delete-when-done the VM goes too
# (if this script created it or found it), else say how to stop the billing.
give_up() {
  if [[ $DELETE_WHEN_DONE -eq 1 && $need_create -eq 0 ]]; then
    delete_vm || log "could not delete $NAME: delete it with gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE"
  elif [[ $need_create -eq 0 ]]; then
    log "$NAME is still there (and billed): gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE"
  fi
  exit "$1"
}

restarts=0; ran_here=0
while :; do
  rc=0
  if [[ $need_create -eq 1 ]]; then
    if [[ $need_delete -eq 1 ]]; then delete_vm || true; fi
    create_vm || rc=$?
    [[ $rc -ne 0 ]] || { need_create=0; need_delete=0; ran_here=0; }
  fi
  if [[ $rc -eq 0 && $need_install -eq 1 ]]; then
    install_package || rc=$?
    [[ $rc -ne 0 ]] || need_install=0
  fi
  if [[ $rc -eq 0 ]]; then
    if [[ $ran_here -eq 1 ]]; then stop_leftovers || true; fi
    ran_here=1
    run_t5x || rc=$?
  fi
  if [[ $rc -eq 0 ]]; then
    if [[ $DRY -eq 1 ]]; then
      echo "# on failure (exit != 0): state=\$($(quote gcloud compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" ${PROJECT_FLAG[@]+"${PROJECT_FLAG[@]}"} '--format=value(state)'))"
      echo "# not READY (PREEMPTED, TERMINATED, gone): delete, create, copy, install and run the same command again;"
      echo "# READY: run the same command again; at most $MAX_RESTARTS restarts, ${RETRY_WAIT}s apart"
    fi
    break
  fi
  if [[ $ran_here -eq 0 && $restarts -eq 0 ]]; then
    # Nothing has run yet: a bad flag, quota, missing capacity or a broken
    # install is for a person to look at, not to retry.
    log "failed before t5x started (exit $rc)"
    give_up "$rc"
  fi
  state=$(vm_state)
  log "failed (exit $rc); $NAME is $state"
  if [[ $restarts -ge $MAX_RESTARTS ]]; then
    log "giving up after $restarts restart(s) (--max-restarts $MAX_RESTARTS)"
    give_up "$rc"
  fi
  restarts=$((restarts + 1))
  case "$state" in
    READY) what="running the same command again on $NAME" ;;
    MISSING) need_create=1; need_install=1; what="creating $NAME again" ;;
    *) need_create=1; need_delete=1; need_install=1; what="deleting and creating $NAME again" ;;
  esac
  log "restart $restarts/$MAX_RESTARTS in ${RETRY_WAIT}s: $what"
  sleep "$RETRY_WAIT"
done

if [[ $DELETE_WHEN_DONE -eq 1 ]]; then delete_vm; fi
[[ $DRY -eq 1 ]] || log "done"
