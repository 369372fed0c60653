#!/usr/bin/env bash
# Bring up a Docker engine and a local base image on a machine like the dev/CI boxes
# (Debian bookworm, root, no image registry reachable, no bridge networking allowed).
#
# Idempotent: every step checks first and does nothing when already done.
#   1. apt-get install docker.io docker-registry debootstrap   (only what is missing)
#   2. start dockerd detached with its own config file:
#        bridge none, iptables false, ip-masq false  -> containers must use --network host
#      pid recorded in $STATE_DIR/dockerd.pid, log in $STATE_DIR/dockerd.log
#   3. wait for `docker info`
#   4. build $BASE_IMAGE (default local/debian:bookworm) with debootstrap + docker import,
#      only when that image is absent.
#
# Env overrides:
#   DOGBREED_DOCKER_STATE  state dir (default /var/run/dogbreed-docker)
#   BASE_IMAGE             tag of the locally made base image (default local/debian:bookworm)
#   DEBIAN_SUITE           debootstrap suite (default bookworm)
#   DEBIAN_MIRROR          mirror (default: the host's apt sources, else deb.debian.org)
#   SKIP_BASE_IMAGE=1      do not build the base image
#
# Stop with scripts/docker-down.sh (stops only the recorded pid).
set -euo pipefail

STATE_DIR=${DOGBREED_DOCKER_STATE:-/var/run/dogbreed-docker}
BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
PIDFILE=$STATE_DIR/dockerd.pid
LOGFILE=$STATE_DIR/dockerd.log
CONFIG=$STATE_DIR/daemon.json

log() { printf '[docker-up] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root (or have sudo)"
    SUDO="sudo"
fi

# The 20.10 client from docker.io; it has BuildKit built in (the newer client on PATH
# may lack buildx). Fall back to whatever `docker` is on PATH.
docker_cli() {
    if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi
}

engine_up() { docker_cli info >/dev/null 2>&1; }

# ---------------------------------------------------------------- 1. packages
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
[ -x /usr/bin/docker ] || command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    # de-duplicate
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "packages present: docker.io docker-registry debootstrap"
fi
export PATH=$PATH:/usr/sbin:/sbin

# ---------------------------------------------------------------- 2. engine
if engine_up; then
    log "docker engine already reachable"
else
    $SUDO mkdir -p "$STATE_DIR"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        log "dockerd (pid $(cat "$PIDFILE")) running but not answering yet"
    else
        $SUDO tee "$CONFIG" >/dev/null <<'EOF'
{
  "bridge": "none",
  "iptables": false,
  "ip-masq": false,
  "ip6tables": false,
  "log-level": "warn"
}
EOF
        log "starting dockerd (config $CONFIG, log $LOGFILE)"
        # setsid + nohup: detached from this shell/session so it survives make/CI steps.
        $SUDO setsid nohup dockerd --config-file "$CONFIG" </dev/null >"$LOGFILE" 2>&1 &
        echo $! | $SUDO tee "$PIDFILE" >/dev/null
    fi
    for _ in $(seq 1 60); do
        engine_up && break
        sleep 1
    done
    engine_up || { tail -n 30 "$LOGFILE" >&2 || true; die "dockerd did not come up in 60 s"; }
    log "docker engine up (pid $(cat "$PIDFILE"))"
fi

# ---------------------------------------------------------------- 3. base image
if [ "${SKIP_BASE_IMAGE:-0}" = 1 ]; then
    log "SKIP_BASE_IMAGE=1: not building $BASE_IMAGE"
elif docker_cli image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE present"
else
    if [ -z "${DEBIAN_MIRROR:-}" ]; then
        # First Debian (non-security) URI from the host's apt sources.
        DEBIAN_MIRROR=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
            | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n 1 || true)
        DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    fi
    log "building $BASE_IMAGE: debootstrap --variant=minbase $DEBIAN_SUITE from $DEBIAN_MIRROR"
    rootfs=$(mktemp -d /tmp/dogbreed-rootfs.XXXXXX)
    trap '$SUDO rm -rf "$rootfs"' EXIT
    t0=$(date +%s)
    $SUDO debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$STATE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$STATE_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
    # No host state in the image: apt lists/caches, the copied resolv.conf, hostname.
    $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* "$rootfs"/tmp/* 2>/dev/null || true
    $SUDO rm -f "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
    $SUDO tar -C "$rootfs" -c . | docker_cli import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    log "built $BASE_IMAGE in $(( $(date +%s) - t0 )) s ($(docker_cli image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
fi
