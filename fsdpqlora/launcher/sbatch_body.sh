
# Submit from the repository root (the job runs in SLURM_SUBMIT_DIR, so relative paths in
# overrides, ./.venv and outputs/ mean what they mean there). Hydra overrides pass through:
#
#   sbatch THIS_SCRIPT model=llama-3.1-70b shard=hybrid_shard train.lr=1e-4
#
# One task per node: `srun` starts the `fsdpqlora` launcher on every node of the job; each starts
# one worker per GPU, and the launchers meet at a c10d rendezvous on the job's first node.
#
# Preemption and time limits: SLURM sends SIGUSR1 to this script before the time limit (--signal
# above); it is forwarded to the launchers, every worker finishes its step, saves a checkpoint and
# exits 75, and this script requeues the job (same job id, so the same run directory), which
# resumes from that checkpoint. A job that SLURM itself requeues or preempts gets SIGTERM, handled
# the same way, within KillWait (slurm.conf, 30 s by default) before SIGKILL.
#
# NCCL across nodes (export before sbatch, or uncomment here):
#   export NCCL_SOCKET_IFNAME=ib0      # the interface between nodes (e.g. ib0, eth0, ^lo,docker0)
#   export NCCL_IB_DISABLE=1           # no InfiniBand / RoCE: TCP sockets only
#   export NCCL_IB_HCA=mlx5            # which InfiniBand adapters to use
#   export NCCL_DEBUG=INFO             # print the transport chosen per connection (WARN: errors only)
#   export NCCL_ASYNC_ERROR_HANDLING=1 # a failed collective ends the process instead of hanging it
#   export GLOO_SOCKET_IFNAME=ib0      # gloo (collectives on CPU tensors: gradient norm and adapter
#                                      # gather under shard.cpu_offload, CPU workers): the same interface

set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"

# The environment: $FSDPQLORA_VENV when set, else ./.venv when present, else the `fsdpqlora` of
# the job's PATH (a module or conda environment loaded before sbatch).
if [[ -n "${FSDPQLORA_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$FSDPQLORA_VENV/bin/activate"
elif [[ -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
if ! command -v fsdpqlora >/dev/null; then
    echo "fsdpqlora job: no 'fsdpqlora' command; set FSDPQLORA_VENV or install the project into ./.venv" >&2
    exit 1
fi

# Each worker gets its part of the task's CPUs (not every cluster restricts the affinity mask);
# without GPUs, launch.cpu_workers (2 by default) share them.
gpus="${SLURM_GPUS_ON_NODE:-0}"
cpus="${SLURM_CPUS_PER_TASK:-1}"
threads=$(( cpus / (gpus > 0 ? gpus : 2) ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
export PYTHONUNBUFFERED=1

# One run directory per job, shared by every node, kept by a requeued job (same id): an override
# of launch.run_dir among "$@" comes later and wins. The rendezvous: the first node of the job, on
# a port derived from the job id (two jobs sharing a node do not collide).
run_dir="@OUTPUT_ROOT@/slurm-${SLURM_JOB_ID}"
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
port=$(( 20000 + SLURM_JOB_ID % 20000 ))

echo "[fsdpqlora job] ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s) from ${head_node}: ${gpus} GPU(s), ${cpus} CPUs per node"
echo "[fsdpqlora job] fsdpqlora launch.run_dir=${run_dir} launch.rdzv_endpoint=${head_node}:${port} $*"

# No --kill-on-bad-exit: a node whose launcher ends with 75 first must not cut short the others'
# (srun's exit code is the highest of its tasks', 75 when all stopped after the checkpoint).
srun --ntasks-per-node=1 \
    fsdpqlora "launch.run_dir=${run_dir}" "launch.rdzv_endpoint=${head_node}:${port}" "$@" &
launcher=$!

received=""
forwarded=0
forward() {
    received="$1"
    forwarded=$(( forwarded + 1 ))
    echo "[fsdpqlora job] SIG$1: asking every worker to checkpoint and stop"
    kill -USR1 "$launcher" 2>/dev/null  # srun passes it on to the launcher of every node
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trap runs; wait again until srun itself has ended.
while :; do
    before=$forwarded
    wait "$launcher"
    code=$?
    (( forwarded == before )) && break
done

if [[ $code -eq 75 && "$received" != TERM ]]; then
    # Stopped after a checkpoint, before the time limit: back in the queue, to resume. (On SIGTERM
    # SLURM is already requeuing or cancelling the job; cancelled must stay cancelled.)
    echo "[fsdpqlora job] checkpoint saved; requeuing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
