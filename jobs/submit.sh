#!/usr/bin/env bash
# Submit a pm-ray run to a Ray cluster: jobs/submit.sh jobs/quickstart.yaml [key=value ...]
# The cluster address comes from RAY_ADDRESS (default: a local head, cluster/local_head.sh).
# The repository is uploaded as the job's working directory; the cluster's Python must already
# have pm-ray's dependencies (torch, ray, deepspeed, peft, transformers, mlflow).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: jobs/submit.sh CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
exec ray job submit --address "$ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv/", "runs/", ".git/", "mlruns/", "**/__pycache__/", "*.safetensors", "*.gguf"], "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}' \
  -- python -m pm_ray.cli run "$@" --quiet
