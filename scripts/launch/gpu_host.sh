#!/usr/bin/env bash
# Start ares-jax replica processes on one GPU host, one per GPU or per group of GPUs, each with
# its own CUDA_VISIBLE_DEVICES, all registering with one scheduler; optionally start that
# scheduler here too. Stays in the foreground as their supervisor: SIGINT/SIGTERM stops every
# child, and when any child exits the others are stopped too, so a batch system (Slurm,
# Kubernetes) sees the host fail as one unit instead of serving with a silent hole.
#
#   scripts/launch/gpu_host.sh --scheduler sched-host:50051 --gpus-per-replica 2 --prefill 1
#   scripts/launch/gpu_host.sh --with-scheduler --scheduler 127.0.0.1:50051 --prefill 1 \
#       --model /models/llama-3.1-8b -- --max-model-len 8192
#   scripts/launch/gpu_host.sh --num-gpus 4 --scheduler 10.0.0.1:50051 --dry-run
#
# Run with --help for every option. Arguments after `--` go to every replica unchanged.
set -euo pipefail

PROG=$(basename "$0")

usage() {
  cat <<EOF
Usage: $PROG --scheduler HOST:PORT [options] [-- extra replica args]

Placement
  --num-gpus N            GPUs on this host (default: CUDA_VISIBLE_DEVICES entries if set,
                          else the count from 'nvidia-smi -L')
  --gpus LIST             explicit GPU ids, comma separated (overrides detection)
  --gpus-per-replica N    GPUs per mesh (default 1); passed as --devices-per-replica
  --meshes-per-process K  meshes hosted by one replica process (default 1); passed as --meshes
Roles (per process, in GPU order: prefill first)
  --prefill N             the first N processes are prefill, the rest decode (default 1)
  --role-split P:D        exactly P prefill and D decode processes
  --role prefill|decode   every process has this role
Addresses
  --scheduler HOST:PORT   the scheduler's gRPC address (default: \$ARES_SCHEDULER)
  --host ADDR             replica bind address (default 0.0.0.0)
  --advertise-host HOST   address the scheduler and peers reach replicas at (default: --host,
                          or this host's name when --host is a wildcard)
  --base-port P           replica i listens on gRPC port P+i (default 0: each picks a free port)
  --model PATH            model for every process (scheduler included)
Scheduler
  --with-scheduler        also start 'ares-jax scheduler' here, on the --scheduler port
  --http-port P           scheduler HTTP port (default 8000)
  --expect-replicas N     replicas the scheduler waits for (default: the processes started here)
  --config FILE           serving config for the scheduler (JSON or YAML)
  --policy NAME           scheduling policy for the scheduler (default: its own)
  --scheduler-arg ARG     extra scheduler argument (repeatable)
Other
  --ares-jax CMD          the ares-jax command (default: \$ARES_JAX, else 'ares-jax')
  --log-dir DIR           write each process's output to DIR/<host>-<name>.log (default:
                          inherit); the host name keeps nodes sharing one DIR apart
  --dry-run               print the commands, one per line, and start nothing
  -h, --help              this text
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# ----------------------------------------------------------------------------- arguments
num_gpus=""
gpu_list=""
gpus_per_replica=1
meshes_per_process=1
prefill=1
role_split=""
role_all=""
scheduler="${ARES_SCHEDULER:-}"
bind_host="0.0.0.0"
advertise_host="${ARES_ADVERTISE_HOST:-}"
base_port=0
model=""
with_scheduler=0
http_port=8000
expect_replicas=""
config=""
policy=""
scheduler_extra=()
ares_jax_cmd="${ARES_JAX:-ares-jax}"
log_dir=""
dry_run=0
replica_extra=()

need_value() { [[ $# -ge 2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-gpus) need_value "$@"; num_gpus=$2; shift 2 ;;
    --gpus) need_value "$@"; gpu_list=$2; shift 2 ;;
    --gpus-per-replica) need_value "$@"; gpus_per_replica=$2; shift 2 ;;
    --meshes-per-process) need_value "$@"; meshes_per_process=$2; shift 2 ;;
    --prefill) need_value "$@"; prefill=$2; shift 2 ;;
    --role-split) need_value "$@"; role_split=$2; shift 2 ;;
    --role) need_value "$@"; role_all=$2; shift 2 ;;
    --scheduler) need_value "$@"; scheduler=$2; shift 2 ;;
    --host) need_value "$@"; bind_host=$2; shift 2 ;;
    --advertise-host) need_value "$@"; advertise_host=$2; shift 2 ;;
    --base-port) need_value "$@"; base_port=$2; shift 2 ;;
    --model) need_value "$@"; model=$2; shift 2 ;;
    --with-scheduler) with_scheduler=1; shift ;;
    --http-port) need_value "$@"; http_port=$2; shift 2 ;;
    --expect-replicas) need_value "$@"; expect_replicas=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --policy) need_value "$@"; policy=$2; shift 2 ;;
    --scheduler-arg) need_value "$@"; scheduler_extra+=("$2"); shift 2 ;;
    --ares-jax) need_value "$@"; ares_jax_cmd=$2; shift 2 ;;
    --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; replica_extra=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[[ -n $scheduler ]] || die "--scheduler HOST:PORT is required (or set ARES_SCHEDULER)"
[[ $scheduler =~ ^(.+):([0-9]+)$ ]] || die "--scheduler must be HOST:PORT, got '$scheduler'"
scheduler_host=${BASH_REMATCH[1]}
scheduler_port=${BASH_REMATCH[2]}
for pair in "gpus-per-replica:$gpus_per_replica" "meshes-per-process:$meshes_per_process" \
  "base-port:$base_port" "http-port:$http_port" "prefill:$prefill"; do
  is_uint "${pair#*:}" || die "--${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
done
((gpus_per_replica >= 1)) || die "--gpus-per-replica must be >= 1"
((meshes_per_process >= 1)) || die "--meshes-per-process must be >= 1"
[[ -z $role_all || $role_all == prefill || $role_all == decode ]] ||
  die "--role must be prefill or decode, got '$role_all'"

# ----------------------------------------------------------------------------- GPUs
# The GPU ids this script may hand out. A scheduler that already confined us (Slurm's gres,
# a container runtime) exports CUDA_VISIBLE_DEVICES; its entries are the ids to split, since
# nvidia-smi lists every GPU on the node regardless of that variable.
gpus=()
if [[ -n $gpu_list ]]; then
  IFS=, read -r -a gpus <<<"$gpu_list"
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif [[ -z $num_gpus ]]; then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: pass --num-gpus or --gpus"
  detected=$(nvidia-smi -L | grep -c '^GPU ' || true)
  ((detected > 0)) || die "nvidia-smi -L lists no GPU"
  for ((i = 0; i < detected; i++)); do gpus+=("$i"); done
fi
if [[ -n $num_gpus ]]; then
  if ! is_uint "$num_gpus" || ((num_gpus < 1)); then
    die "--num-gpus must be >= 1, got '$num_gpus'"
  fi
  if ((${#gpus[@]} == 0)); then
    for ((i = 0; i < num_gpus; i++)); do gpus+=("$i"); done
  elif ((num_gpus > ${#gpus[@]})); then
    die "--num-gpus $num_gpus but only ${#gpus[@]} GPU ids are visible (${gpus[*]})"
  else
    gpus=("${gpus[@]:0:num_gpus}")
  fi
fi

per_process=$((gpus_per_replica * meshes_per_process))
num_procs=$((${#gpus[@]} / per_process))
((num_procs >= 1)) ||
  die "${#gpus[@]} GPU(s) cannot hold one process of $per_process GPU(s)"
leftover=$((${#gpus[@]} - num_procs * per_process))
((leftover == 0)) || echo "$PROG: warning: $leftover GPU(s) left unused" >&2

# ----------------------------------------------------------------------------- roles
n_prefill=$prefill
n_decode=$((num_procs - prefill))
if [[ -n $role_all ]]; then
  if [[ $role_all == prefill ]]; then n_prefill=$num_procs; n_decode=0
  else n_prefill=0; n_decode=$num_procs; fi
elif [[ -n $role_split ]]; then
  [[ $role_split =~ ^([0-9]+):([0-9]+)$ ]] || die "--role-split must be P:D, got '$role_split'"
  n_prefill=${BASH_REMATCH[1]}
  n_decode=${BASH_REMATCH[2]}
  ((n_prefill + n_decode <= num_procs)) ||
    die "--role-split $role_split needs $((n_prefill + n_decode)) processes;" \
      "${#gpus[@]} GPU(s) hold $num_procs of $per_process GPU(s)"
fi
((n_prefill <= num_procs && n_decode >= 0)) ||
  die "--prefill $prefill exceeds the $num_procs process(es) this host holds"
total=$((n_prefill + n_decode))
((total >= 1)) || die "no replica process to start"

if [[ -z $advertise_host ]]; then
  case $bind_host in
    0.0.0.0 | :: | "[::]") advertise_host=$(hostname -f 2>/dev/null || hostname) ;;
    *) advertise_host=$bind_host ;;
  esac
fi

# ----------------------------------------------------------------------------- commands
read -r -a ares_jax <<<"$ares_jax_cmd"  # allow e.g. "python -m ares_jax.cli"
names=()
envs=()      # CUDA_VISIBLE_DEVICES per process; "-" for none
commands=()  # each a NUL-free, %q-quoted command line, re-split with eval at launch

quote() {
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  printf '%s' "${out% }"
}

if ((with_scheduler)); then
  sched=("${ares_jax[@]}" scheduler --host "$bind_host" --grpc-port "$scheduler_port"
    --port "$http_port" --expect-replicas "${expect_replicas:-$total}")
  [[ -n $config ]] && sched+=(--config "$config")
  [[ -n $policy ]] && sched+=(--policy "$policy")
  [[ -n $model ]] && sched+=(--model "$model")
  sched+=("${scheduler_extra[@]}")
  names+=(scheduler)
  envs+=("-")
  commands+=("$(quote "${sched[@]}")")
fi

for ((p = 0; p < total; p++)); do
  role=decode
  ((p < n_prefill)) && role=prefill
  visible=$(
    IFS=,
    echo "${gpus[*]:p*per_process:per_process}"
  )
  port=0
  ((base_port > 0)) && port=$((base_port + p))
  cmd=("${ares_jax[@]}" replica --role "$role" --scheduler "$scheduler"
    --host "$bind_host" --grpc-port "$port" --advertise-host "$advertise_host"
    --devices-per-replica "$gpus_per_replica" --meshes "$meshes_per_process")
  [[ -n $model ]] && cmd+=(--model "$model")
  cmd+=("${replica_extra[@]}")
  names+=("$role-$p")
  envs+=("$visible")
  commands+=("$(quote "${cmd[@]}")")
done

if ((dry_run)); then
  for i in "${!commands[@]}"; do
    if [[ ${envs[i]} == "-" ]]; then
      echo "${commands[i]}"
    else
      echo "CUDA_VISIBLE_DEVICES=${envs[i]} ${commands[i]}"
    fi
  done
  exit 0
fi

# ----------------------------------------------------------------------------- supervise
pids=()
scheduler_pid=""
stopping=0  # set once stop_all has run, so the EXIT trap does not run it twice

stop_all() {
  # Replicas first, so they can deregister from a scheduler that is still up; then the
  # scheduler. TERM, then KILL whatever is left after the grace period.
  stopping=1
  local replicas=() pid
  for pid in "${pids[@]}"; do
    [[ $pid == "${scheduler_pid:-}" ]] || replicas+=("$pid")
  done
  stop_pids "${replicas[@]}"
  [[ -z ${scheduler_pid:-} ]] || stop_pids "$scheduler_pid"
  wait 2>/dev/null || true
}

stop_pids() {
  local pid deadline=$((SECONDS + ${ARES_STOP_GRACE_S:-20}))
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  echo "$PROG: $1, stopping ${#pids[@]} process(es)" >&2
  stop_all
  exit $((128 + $2))
}
trap 'on_signal SIGINT 2' INT
trap 'on_signal SIGTERM 15' TERM
# shellcheck disable=SC2329  # invoked by the EXIT trap
on_exit() { ((stopping)) || stop_all; }
trap on_exit EXIT

wait_for_port() {
  # The scheduler must listen before replicas try to register; bash's /dev/tcp needs no tools.
  local host=$1 port=$2 timeout=$3 start=$SECONDS
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    ((SECONDS - start < timeout)) || die "the scheduler did not listen on $host:$port within ${timeout}s"
    kill -0 "$scheduler_pid" 2>/dev/null || die "the scheduler exited before listening"
    sleep 0.5
  done
}

short_host=$(hostname -s 2>/dev/null || hostname)
[[ -n $log_dir ]] && mkdir -p "$log_dir"
for i in "${!commands[@]}"; do
  eval "cmd=(${commands[i]})"
  if [[ ${envs[i]} == "-" ]]; then
    child_env=()
  else
    child_env=("CUDA_VISIBLE_DEVICES=${envs[i]}")
  fi
  echo "$PROG: starting ${names[i]}${child_env[*]:+ (${child_env[*]})}: ${commands[i]}" >&2
  if [[ -n $log_dir ]]; then
    env "${child_env[@]}" "${cmd[@]}" >"$log_dir/$short_host-${names[i]}.log" 2>&1 &
  else
    env "${child_env[@]}" "${cmd[@]}" &
  fi
  pids+=("$!")
  if [[ ${names[i]} == scheduler ]]; then
    scheduler_pid=$!
    connect_host=$scheduler_host
    [[ $connect_host == 0.0.0.0 ]] && connect_host=127.0.0.1
    wait_for_port "$connect_host" "$scheduler_port" "${ARES_SCHEDULER_WAIT_S:-300}"
  fi
done

echo "$PROG: ${#pids[@]} process(es) running: $n_prefill prefill, $n_decode decode" \
  "$( ((with_scheduler)) && echo "+ scheduler on :$scheduler_port (HTTP :$http_port)")" >&2

# The first child to exit ends the host: stop the rest and pass its status on.
status=0
wait -n || status=$?
echo "$PROG: a process exited (status $status); stopping the others" >&2
stop_all
exit "$status"
