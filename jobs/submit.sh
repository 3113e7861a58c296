#!/usr/bin/env bash
# Submit a pm-ray run to a Ray cluster: jobs/submit.sh jobs/quickstart.yaml [key=value ...]
# The cluster address comes from RAY_ADDRESS (default: a local head, cluster/local_head.sh).
# The repository is uploaded as the job's working directory; the cluster's Python must already
# have pm-ray's dependencies (torch, ray, deepspeed, peft, transformers, mlflow).
# The job is submitted without waiting (retried while a fresh head's job agent is not up yet),
# then its logs are followed; the exit code is 0 when the job succeeded, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: jobs/submit.sh CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
JOB_ID="pm-ray-$(basename "${1%.*}")-$(date +%Y%m%d-%H%M%S)-$$"
RUNTIME_ENV='{"excludes": [".venv/", "runs/", ".git/", "mlruns/", "**/__pycache__/", "*.safetensors", "*.gguf"], "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}'

for attempt in $(seq 1 30); do
  if out=$(ray job submit --address "$ADDRESS" --no-wait --submission-id "$JOB_ID" --working-dir . \
             --runtime-env-json "$RUNTIME_ENV" -- python -m pm_ray.cli run "$@" --quiet 2>&1); then
    break
  fi
  if grep -q "No available agent" <<<"$out" && [ "$attempt" -lt 30 ]; then
    # a fresh head's job agent registers a few seconds after the dashboard listens
    [ "$attempt" -eq 1 ] && echo "waiting for the cluster's job agent ..." >&2
    sleep 2
    continue
  fi
  echo "$out" >&2
  echo "jobs/submit.sh: ray job submit to $ADDRESS failed" >&2
  exit 1
done
echo "submitted $JOB_ID to $ADDRESS"
ray job logs --address "$ADDRESS" --follow "$JOB_ID" || true
status=$(ray job status --address "$ADDRESS" "$JOB_ID" 2>&1)
echo "$status"
grep -qi "succeeded" <<<"$status"
