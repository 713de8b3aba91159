#!/usr/bin/env bash
# Run the OPD trainer on every worker of a Cloud TPU VM pod slice.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
# Assumes the repository is checked out at the same path on every worker with `.[tpu]` installed
# in .venv (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all --command="cd REPO && make install
# && .venv/bin/pip install -e '.[tpu]'"`). WORKDIR must be shared storage (a gs:// bucket) so all
# hosts see the same checkpoints. Each worker runs one process; the trainer calls
# jax.distributed.initialize(), which discovers the pod topology by itself on TPU VMs.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
repo=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="\
  cd $repo && EFFOPD_DISTRIBUTED=1 .venv/bin/python -m effopd_jax.train \
  --config=$config --workdir=$workdir $extra"
