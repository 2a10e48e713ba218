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
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# The CPU build of torch as a wheel file on local disk, where pip's find-links point (pip's
# config or PIP_FIND_LINKS): none on a plain machine.
local_torch() {
  local tag dirs dir wheel
  tag=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  dirs="${PIP_FIND_LINKS:-} $(.venv/bin/pip config get global.find-links 2>/dev/null || true)"
  for dir in $dirs; do
    dir=${dir#file://}
    for wheel in "$dir"/torch-"$TORCH_VERSION"+cpu-"$tag"-"$tag"-*linux*_x86_64.whl; do
      [ -f "$wheel" ] && { echo "$wheel"; return; }
    done
  done
}

torch_wheel=$(local_torch)
if [ -n "$torch_wheel" ]; then
  # uv installs in parallel from its cache: about 30 s on a fresh machine where pip took
  # about 2 minutes, and a few seconds when everything is installed already. uv reads no
  # pip config: torch is named by its local file, so the project's torch range is met by
  # the CPU build and nothing pulls a multi-GB CUDA build from the index. Bytecode is
  # compiled here, as pip does (uv does not by default): every test process, trainer and
  # worker imports torch, scipy and aiogram, about 3 s more each from source.
  [ -x .venv/bin/uv ] || .venv/bin/pip install -q --disable-pip-version-check "uv==0.13.9"
  .venv/bin/uv pip install -q --system-certs --compile-bytecode --python .venv/bin/python \
    "$torch_wheel" -e ".[dev]"
else
  # No local wheel: pip, with whatever its config names. torch first, pinned, so that the
  # project's torch range is then already satisfied.
  .venv/bin/pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
fi
