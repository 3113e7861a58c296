#!/usr/bin/env bash
# A local Ray head on 127.0.0.1 with the dashboard/job server (port 8265), for `jobs/submit.sh`.
#   cluster/local_head.sh start | stop
# RAY_AGENT_PORT sets the job agent's HTTP port (default 52365); change it when another Ray on this
# machine holds that port, or job submissions fail with "No available agent to submit job".
set -euo pipefail
case "${1:-start}" in
  start)
    RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" ray start --head --node-ip-address=127.0.0.1 \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --include-dashboard=true --disable-usage-stats \
      --dashboard-agent-listen-port="${RAY_AGENT_PORT:-52365}"
    echo "export RAY_ADDRESS=http://127.0.0.1:8265" ;;
  stop)
    ray stop ;;
  *)
    echo "usage: cluster/local_head.sh start|stop" >&2; exit 2 ;;
esac
