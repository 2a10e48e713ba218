#!/usr/bin/env bash
# Build the local Debian base image that CI builds every image of the stack from, when no
# image registry is reachable: debootstrap (minbase) of Debian bookworm from the Debian
# mirror apt uses, imported as smart-tuner/debian-base:bookworm. Skipped when the image
# exists (delete it to rebuild: docker rmi smart-tuner/debian-base:bookworm).
#
#   bash scripts/docker-base-image.sh [image tag]
#
# Users with a registry never need this: deploy/Dockerfile defaults to python:3.11-slim and
# docker-compose.yml to the official Redis, Prometheus, Alertmanager and Grafana images.
# Needs root (debootstrap) and a running Docker engine.
set -euo pipefail
IMAGE=${1:-${SMART_TUNER_BASE_IMAGE:-smart-tuner/debian-base:bookworm}}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi
command -v debootstrap >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base image $IMAGE: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >/dev/null
# As the official debian image: main, updates and security; no apt lists kept.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
SOURCES
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: built"
