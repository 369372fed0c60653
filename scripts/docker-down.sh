#!/usr/bin/env bash
# Stop the dockerd started by scripts/docker-up.sh (only the pid it recorded).
set -euo pipefail
STATE_DIR=${DOGBREED_DOCKER_STATE:-/var/run/dogbreed-docker}
PIDFILE=$STATE_DIR/dockerd.pid
if [ ! -f "$PIDFILE" ]; then
    echo "[docker-down] no $PIDFILE: nothing started by docker-up.sh" >&2
    exit 0
fi
pid=$(cat "$PIDFILE")
if kill -0 "$pid" 2>/dev/null; then
    echo "[docker-down] stopping dockerd pid $pid" >&2
    kill -TERM "$pid"
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pid" 2>/dev/null && { echo "[docker-down] pid $pid still alive after 30 s" >&2; exit 1; }
fi
rm -f "$PIDFILE"
echo "[docker-down] stopped" >&2
