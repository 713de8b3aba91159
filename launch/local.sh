#!/usr/bin/env bash
# Run the OPD trainer on this machine (all local devices, one process).
#   launch/local.sh configs/tiny_cpu.py runs/tiny [--config.key=value ...]
# Re-running the same command with the same workdir resumes from the last checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
exec "$python" -m effopd_jax.train --config="$config" --workdir="$workdir" "$@"
