#!/usr/bin/env bash
# Launch megatron_bigmac.train with torchrun on this node: all its GPUs, or N CPU processes.
#
#   scripts/torchrun.sh [--nproc N] [--dry-run] CONFIG [key=value ...]
#
#   scripts/torchrun.sh configs/small/bigmac.yaml                  # every GPU of this node
#   NPROC=2 scripts/torchrun.sh configs/tiny/bigmac.yaml train_iters=20   # 2 CPU processes (gloo)
#
# Environment (all optional; the command line's --nproc wins over NPROC):
#   NPROC            processes on this node (default: the GPUs CUDA_VISIBLE_DEVICES/nvidia-smi
#                    show, or 1 without GPUs)
#   PYTHON           interpreter holding torch and megatron_bigmac (default: python3)
#   TRAIN_MODULE     module to run (default: megatron_bigmac.train)
#   LOG_DIR          if set, torchrun also writes each rank's stdout/stderr under it
#   Multi-node (scripts/slurm/pretrain.sbatch sets these on every node):
#   NNODES           number of nodes (default 1: a standalone rendezvous on this node)
#   NODE_RANK        this node's index; 0 is the node that hosts the rendezvous
#   RDZV_HOST, RDZV_PORT (default 29500), RDZV_ID (default: $SLURM_JOB_ID or "bigmac")
#   RDZV_WAIT        seconds a node other than the first waits for the rendezvous host (300)
#   MEGATRON_BIGMAC_CACHE  the trainer's data cache (unless the config has data_cache_path):
#                    rank 0 writes the dataset indices there and every node reads them, so on
#                    several nodes it must be a shared directory (pretrain.sbatch sets one)
#   NCCL_IB_HCA, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME: used as given; where unset on a
#                    multi-node launch, picked from this node's active InfiniBand ports
#                    (/sys/class/infiniband; not RoCE) and IPoIB interface, if any.
#
# Signals: SIGUSR1 to this script (SLURM's --signal, through srun) is passed to the training
# processes, which checkpoint and exit; torchrun itself ignores it. SIGTERM/SIGINT go to torchrun,
# which passes them on and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 120).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}

die() { echo "torchrun.sh: error: $1" >&2; exit "${2:-2}"; }
# SIGUSR1 may come before torchrun starts (a node waiting up to RDZV_WAIT for node 0, a short
# --time): without a handler bash dies of it. Remembered here; the training is then not started.
early_usr1=0
trap 'early_usr1=1' USR1
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

dry_run=0
nproc=${NPROC:-}
config=""
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) dry_run=1 ;;
        --nproc|--nproc-per-node) [ $# -ge 2 ] || die "$1 needs a number"; nproc=$2; shift ;;
        --nproc=*|--nproc-per-node=*) nproc=${1#*=} ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            if [ -z "$config" ]; then config=$1
            elif [[ "$1" == *=* ]]; then overrides+=("$1")
            else die "'$1' is not of the form key=value (overrides follow the config)"
            fi ;;
    esac
    shift
done
[ -n "$config" ] || { usage >&2; die "no config given"; }
[ -f "$config" ] || die "config not found: $config"

# ------------------------------------------------------------------ processes on this node
count_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
        local v=${CUDA_VISIBLE_DEVICES// /}
        if [ -z "$v" ] || [ "$v" = "-1" ] || [ "$v" = "NoDevFiles" ]; then echo 0; return; fi
        echo $(( $(tr -cd ',' <<<"$v" | wc -c) + 1 )); return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
gpus=$(count_gpus)
if [ -z "$nproc" ]; then
    nproc=$(( gpus > 0 ? gpus : 1 ))
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc/NPROC must be a positive integer, got '$nproc'"
notes=()
if [ "$gpus" -gt 0 ] && [ "$nproc" -gt "$gpus" ]; then
    # A dry run often describes other nodes (pretrain.sbatch --dry-run on a login node): say it.
    [ "$dry_run" = 1 ] || die "$nproc processes asked for but only $gpus GPU(s) visible on $(hostname -s)"
    notes+=("$nproc processes per node, but this host ($(hostname -s)) sees $gpus GPU(s): a real launch here would stop")
fi
nnodes=${NNODES:-1}
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$nnodes'"

# ------------------------------------------------------------------ parallel sizes fit?
# SLURM forwards a signal to every process of the step: the check ignores an early SIGUSR1
# (the trap above remembers it) instead of dying of it.
plan=$(trap '' USR1; "$PYTHON" "$HERE/launch_plan.py" --config "$config" --nnodes "$nnodes" \
        --nproc-per-node "$nproc" --format shell "${overrides[@]}") || exit 2
eval "$plan"

# ------------------------------------------------------------------ environment
# megatron-core orders TP/SP communication and compute on one CUDA connection.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
export PYTHONUNBUFFERED=1
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cpus=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=$(( cpus / nproc > 0 ? cpus / nproc : 1 ))
fi

# InfiniBand for NCCL on multi-node launches, unless the environment already chose. Only ports
# whose link layer is InfiniBand: mlx5 NICs in Ethernet mode (storage, frontend) are no rails, and
# the "=" list would pin NCCL to them. A node without InfiniBand ports keeps NCCL's own choice.
# NCCL_IB_GID_INDEX is never set: InfiniBand needs none, and for RoCE NCCL >= 2.21 (torch >= 2.6
# ships it) picks a RoCE v2 GID itself, where a fixed index (3) depends on the NIC's addresses.
ib_class=${BIGMAC_TEST_SYSFS:-/sys}/class/infiniband   # BIGMAC_TEST_SYSFS: a fake /sys, for tests
ib_notes=()
if [ "$nnodes" -gt 1 ] && [ -d "$ib_class" ]; then
    ib_ports=(); skipped=()
    for port_dir in "$ib_class"/*/ports/*; do
        [ -r "$port_dir/state" ] || continue
        grep -q ACTIVE "$port_dir/state" || continue
        port=$(basename "$(dirname "$(dirname "$port_dir")")"):$(basename "$port_dir")
        layer=$(cat "$port_dir/link_layer" 2>/dev/null || echo InfiniBand)
        if [ "$layer" = InfiniBand ]; then ib_ports+=("$port"); else skipped+=("$port"); fi
    done
    if [ -z "${NCCL_IB_HCA+x}" ] && [ ${#ib_ports[@]} -gt 0 ]; then
        export NCCL_IB_HCA="=$(IFS=,; echo "${ib_ports[*]}")"
        ib_notes+=("NCCL_IB_HCA=$NCCL_IB_HCA (active InfiniBand ports${skipped[0]:+; not the Ethernet/RoCE ports ${skipped[*]}})")
    fi
    if [ -z "${NCCL_SOCKET_IFNAME+x}" ]; then
        ipoib=$(ip -o -4 addr show 2>/dev/null | awk '$2 ~ /^ib/ {print $2; exit}' || true)
        if [ -n "$ipoib" ]; then
            export NCCL_SOCKET_IFNAME=$ipoib
            export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$ipoib}
            ib_notes+=("NCCL_SOCKET_IFNAME=$ipoib (IPoIB)")
        fi
    fi
fi

if [ "$nnodes" -gt 1 ] && [ -z "${MEGATRON_BIGMAC_CACHE:-}" ] && [ -z "$PLAN_DATA_CACHE_PATH" ]; then
    notes+=("neither MEGATRON_BIGMAC_CACHE nor data_cache_path is set: the data cache is ~/.cache/megatron_bigmac, which every node must share")
fi

# ------------------------------------------------------------------ rendezvous
if [ "$nnodes" -eq 1 ] && [ -z "${RDZV_HOST:-}" ]; then
    rdzv=(--standalone)
    rdzv_text="standalone on $(hostname -s)"
else
    [ -n "${RDZV_HOST:-}" ] || die "NNODES=$nnodes needs RDZV_HOST (the first node's name or address)"
    rdzv_port=${RDZV_PORT:-29500}
    rdzv=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$rdzv_port"
          --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-bigmac}}")
    rdzv_text="c10d at $RDZV_HOST:$rdzv_port"
fi

module=${TRAIN_MODULE:-megatron_bigmac.train}
cmd=("$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node="$nproc" --max-restarts=0)
if [ -n "${LOG_DIR:-}" ]; then
    cmd+=(--log-dir="$LOG_DIR/${NODE_RANK:+node}${NODE_RANK:-$(hostname -s)}" --tee=3)
fi
cmd+=(-m "$module" --config "$config" "${overrides[@]}")

if [ "$dry_run" = 1 ]; then
    echo "rendezvous: $rdzv_text"
    echo "$PLAN_SUMMARY"
    for note in "${ib_notes[@]}"; do echo "auto: $note"; done
    for note in "${notes[@]}"; do echo "note: $note"; done
    echo "env: CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS=$OMP_NUM_THREADS"
    printf 'command:'; printf ' %q' "${cmd[@]}"; echo
    exit 0
fi

# ------------------------------------------------------------------ reach the rendezvous host
if [ "${rdzv[0]}" != --standalone ]; then
    addrs=$(getent ahosts "$RDZV_HOST" 2>/dev/null | awk '{print $1}' | sort -u || true)
    [ -n "$addrs" ] || die "rendezvous host '$RDZV_HOST' does not resolve on $(hostname -s) (set RDZV_HOST to the first node's name or address)" 3
    if [ "${NODE_RANK:-0}" = 0 ]; then
        local_addrs=" $(hostname -I 2>/dev/null) $(hostname -i 2>/dev/null) "
        is_local=0
        for a in $addrs; do
            case "$a" in 127.*|::1) is_local=1 ;; esac
            [[ "$local_addrs" == *" $a "* ]] && is_local=1
        done
        [ "$is_local" = 1 ] || die "rendezvous host '$RDZV_HOST' ($(echo $addrs)) is not an address of this node, $(hostname -s), which is node 0 and must host the rendezvous" 3
    else
        wait_s=${RDZV_WAIT:-300}
        start=$SECONDS; reached=0
        while [ "$early_usr1" = 0 ] && [ $(( SECONDS - start )) -lt "$wait_s" ]; do
            if timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$RDZV_HOST" "$rdzv_port" 2>/dev/null; then reached=1; break; fi
            sleep 1 || true  # a step-wide SIGUSR1 kills the sleep, not this script
        done
        [ "$reached" = 1 ] || [ "$early_usr1" = 1 ] || die "cannot reach the rendezvous host $RDZV_HOST:$rdzv_port from $(hostname -s) within ${wait_s}s (is node 0 up? firewall? RDZV_HOST/RDZV_PORT/NCCL_SOCKET_IFNAME)" 3
    fi
fi

if [ "$early_usr1" = 1 ]; then
    echo "torchrun.sh: $(hostname -s): SIGUSR1 before the training started: not starting it"
    exit 0
fi
echo "torchrun.sh: $(hostname -s): rendezvous $rdzv_text; $(head -n1 <<<"$PLAN_SUMMARY")"
for note in "${ib_notes[@]}"; do echo "torchrun.sh: auto: $note"; done
for note in "${notes[@]}"; do echo "torchrun.sh: note: $note"; done

# torchrun ignores SIGUSR1 (it would die of it); this shell passes it to the training processes,
# which SLURM may also have signalled directly (handling it twice must be harmless).
( trap '' USR1; exec "${cmd[@]}" ) &
child=$!
# The training processes are torchrun's direct children, each in a session of its own (so a
# signal to this script's process group misses them). Found through /proc, since slim container
# images often lack pkill/pgrep (procps).
children_of() {
    cat /proc/"$1"/task/*/children 2>/dev/null \
        || pgrep -P "$1" 2>/dev/null \
        || true
}
forward_usr1() {
    echo "torchrun.sh: $(hostname -s): SIGUSR1: asking the training processes to checkpoint and stop"
    local pid
    for pid in $(children_of "$child"); do kill -USR1 "$pid" 2>/dev/null || true; done
}
forward() { kill -s "$1" "$child" 2>/dev/null || true; }
trap forward_usr1 USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
rc=0
while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
