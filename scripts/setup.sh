#!/usr/bin/env bash
# Set up a fresh machine for Smart Tuner: system packages, a virtualenv, the project.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng speaks the demo corpus; redis-server is the fallback bus when none answers;
# prometheus (promtool), prometheus-alertmanager (amtool) and docker-compose check the
# deployment's configs in CI.
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
command -v docker-compose >/dev/null || missing+=(docker-compose)
# festvox-ru: the recorded Russian corpus (smart-tuner corpus --source festvox-ru).
[ -f /usr/share/festival/voices/russian/msu_ru_nsh_clunits/etc/txt.done.data ] \
  || missing+=(festvox-ru)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: on a CPU machine this takes the local CPU build, and the project's
# torch range is then already satisfied, so nothing pulls a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
