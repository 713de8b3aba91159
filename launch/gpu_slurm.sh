#!/usr/bin/env bash
# Multi-node GPU training under SLURM, one process per GPU (or per node with PROCS_PER_NODE=1).
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh CONFIG WORKDIR [--config.key=value ...]
# jax.distributed.initialize() reads the coordinator, process count and process id from the SLURM
# environment (SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID), so nothing is passed by hand.
# WORKDIR must be on a file system every node sees.
#SBATCH --job-name=effopd
#SBATCH --ntasks-per-node=8
#SBATCH --exclusive
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [slurm options] $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
repo=${REPO_DIR:-$SLURM_SUBMIT_DIR}
procs_per_node=${PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
srun --ntasks-per-node="$procs_per_node" --kill-on-bad-exit=1 \
  env EFFOPD_DISTRIBUTED=1 "$repo/.venv/bin/python" -m effopd_jax.train \
  --config="$config" --workdir="$workdir" "$@"
