#!/usr/bin/env bash
# The compose smoke run: build the images, start the real stack of docker-compose.yml with
# the CPU override and the CI override (deploy/docker/docker-compose.ci.yml), wait for every
# health check, check that it works end to end, and take it down again.
#
#   bash scripts/compose-smoke.sh        # as root where dockerd is not running yet
#
# Checks, in order: the trainer steps and its metrics reach Redis; the diagnostics worker
# scores the trainer's attention snapshots; the tuner's API answers /runs; Prometheus has
# every target up and every alerting rule loaded; a command through the API (with the API
# token; refused without it) is acked by the trainer in its container; the injected
# gradient spike fires GradNormRedFlag in Prometheus, Alertmanager posts it to the notifier
# and the Telegram stand-in receives the message; `down -v` leaves no container, volume or
# network behind. Each stage prints its elapsed time. Grafana is not started: it has no
# Debian package, and no registry is reachable here to pull its image.
#
# Without an image registry: every image is built FROM a local Debian base made with
# debootstrap (scripts/docker-base-image.sh), apt and pip reach their registries through the
# host's network, and torch is the CPU wheel scripts/setup.sh installs (from pip's
# find-links), copied into deploy/build-inputs/ with the host's CA bundle. Docker's layer
# cache keeps the images between runs: a warm run rebuilds nothing.
#
# The stack runs as its own compose project (SMOKE_PROJECT, default smart-tuner-smoke) with
# a scratch settings file (random Redis password and API token, the stand-in's bot token):
# a local .env is neither read nor written. The demo corpus is data/smoke (24 utterances
# spoken by espeak-ng on this machine), mounted read-only as DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${SMOKE_PROJECT:-smart-tuner-smoke}
RUN_ID=smoke
CHAT=1001
BOT_TOKEN="12345:FAKE-test-token-for-the-stand-in-not-real"  # tests/telegram_stand_in.py
BASE_IMAGE=${CI_BASE_IMAGE:-smart-tuner/debian-base:bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LOG_DIR=${SMOKE_LOG_DIR:-/tmp/smart-tuner-smoke}
HEALTH_TIMEOUT_S=${SMOKE_HEALTH_TIMEOUT_S:-300}
CHECK_TIMEOUT_S=${SMOKE_CHECK_TIMEOUT_S:-300}
mkdir -p "$LOG_DIR"

started=$(date +%s.%N)
stage_at=$started
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
stage() {  # stage NAME: the previous stage is done; print its time and the total so far
  echo "[smoke] $(printf '%-34s' "$1") $(elapsed "$stage_at") s (total $(elapsed "$started") s)"
  stage_at=$(date +%s.%N)
}
fail() { echo "[smoke] FAILED: $*" >&2; exit 1; }

# ---- the Docker engine -------------------------------------------------------------------
# Debian's docker CLI has no buildx: the classic builder (with its layer cache) everywhere.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || fail "no Docker engine answers, and only root may start dockerd"
  echo "[smoke] starting dockerd (log: $LOG_DIR/dockerd.log)"
  # --iptables=false: the engine leaves the host's firewall alone; containers reach each
  # other on the compose network, and the checks run inside it (no published port needed).
  nohup dockerd --iptables=false >"$LOG_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not answer in 60 s: $LOG_DIR/dockerd.log"
fi
stage "docker engine"

# ---- build inputs ------------------------------------------------------------------------
bash scripts/docker-base-image.sh "$BASE_IMAGE"
# The CPU wheel of torch that scripts/setup.sh installs: on pip's find-links.
tag=cp311  # the Python of the image (Debian bookworm's python3, python:3.11-slim)
wheel=""
for dir in ${PIP_FIND_LINKS:-} $(.venv/bin/pip config get global.find-links 2>/dev/null || true); do
  dir=${dir#file://}
  for candidate in "$dir"/torch-"$TORCH_VERSION"+cpu-"$tag"-"$tag"-*linux*_x86_64.whl; do
    [ -f "$candidate" ] && { wheel=$candidate; break 2; }
  done
done
[ -n "$wheel" ] || fail "no torch-$TORCH_VERSION+cpu $tag wheel on pip's find-links" \
  "(PIP_FIND_LINKS or pip config global.find-links): the image would pull torch from" \
  "TORCH_INDEX_URL instead; put the wheel in deploy/build-inputs/ to use it"
inputs=deploy/build-inputs
cmp -s "$wheel" "$inputs/$(basename "$wheel")" 2>/dev/null || cp "$wheel" "$inputs/"
# The CA bundle pip trusts inside the build: the host's (a proxy may re-sign TLS).
bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$bundle" ]; then
  cmp -s "$bundle" "$inputs/ca-certificates.crt" || cp "$bundle" "$inputs/ca-certificates.crt"
fi
# The demo corpus, spoken by espeak-ng here (idempotent: only missing wavs are made).
if [ -x .venv/bin/smart-tuner ]; then
  .venv/bin/smart-tuner corpus --out data/smoke --english 24 --russian 0 >/dev/null 2>&1 \
    || fail "smart-tuner corpus --out data/smoke"
else
  fail "no .venv/bin/smart-tuner to speak the demo corpus: run scripts/setup.sh first"
fi
stage "base image, torch wheel, corpus"

# ---- settings: a scratch file, never the local .env ----------------------------------------
scratch=$(mktemp -d)
env_file=$scratch/smoke.env
token() { python3 -c "import secrets; print(secrets.token_urlsafe(24))"; }
api_token=$(token)
# Free host ports for the published ones: the defaults (8000, 9090, ...) may be taken here.
read -r api_port prometheus_port alertmanager_port grafana_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
cat >"$env_file" <<EOF
RUN_ID=$RUN_ID
PRESET=tiny
DATA_DIR=./data/smoke
PUBLISH_ADDR=127.0.0.1
API_PORT=$api_port
PROMETHEUS_PORT=$prometheus_port
ALERTMANAGER_PORT=$alertmanager_port
GRAFANA_PORT=$grafana_port
TORCH_VERSION=$TORCH_VERSION
CI_BASE_IMAGE=$BASE_IMAGE
REDIS_PASSWORD=$(token)
SMART_TUNER_LOG_LEVEL=INFO
SMART_TUNER_NUM_THREADS=1
SMART_TUNER_API_TOKEN=$api_token
SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN=$BOT_TOKEN
SMART_TUNER_NOTIFIER_CHAT_IDS=$CHAT
SMART_TUNER_NOTIFIER_LANGUAGE=en
EOF
export STACK_ENV_FILE=$env_file
compose() {
  docker-compose -p "$PROJECT" --env-file "$env_file" -f docker-compose.yml \
    -f deploy/docker/docker-compose.cpu.yml -f deploy/docker/docker-compose.ci.yml "$@"
}

finish() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ]; then
    echo "[smoke] failed (exit $rc); the stack as it was:" >&2
    compose ps >&2
    compose logs --no-color --tail 60 >"$LOG_DIR/compose.log" 2>&1
    tail -n 200 "$LOG_DIR/compose.log" >&2
    echo "[smoke] full logs: $LOG_DIR/compose.log" >&2
  fi
  compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1
  rm -rf "$scratch"
  exit "$rc"
}
trap finish EXIT

# ---- build and start ------------------------------------------------------------------------
compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true  # a run left over
# One build of the app image (every Python service and the stand-in share it) and the
# three Debian equivalents of the official images.
compose build redis prometheus alertmanager trainer-cpu >"$LOG_DIR/build.log" 2>&1 \
  || { tail -n 40 "$LOG_DIR/build.log" >&2; fail "build (log: $LOG_DIR/build.log)"; }
stage "build (log: $LOG_DIR/build.log)"
compose up -d --no-build
stage "up -d"

# ---- every health check -------------------------------------------------------------------
deadline=$((SECONDS + HEALTH_TIMEOUT_S))
while :; do
  ids=$(compose ps -q)
  [ -n "$ids" ] || fail "no container started"
  # shellcheck disable=SC2086
  states=$(docker inspect --format '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-check{{end}}' $ids)
  if ! grep -qv " running healthy$" <<<"$states"; then break; fi
  if [ "$SECONDS" -gt "$deadline" ]; then
    echo "$states" >&2
    fail "not every container was healthy within $HEALTH_TIMEOUT_S s"
  fi
  sleep 3
done
echo "$states" | sed 's#^/#[smoke]   #'
[ "$(wc -l <<<"$states")" -eq 9 ] || fail "expected 9 containers, got: $states"
stage "every health check passes"

# ---- the checks ---------------------------------------------------------------------------
redis() { compose exec -T redis redis-cli --no-auth-warning "$@"; }
wait_stream() {  # wait_stream STREAM MIN: the run's stream holds at least MIN entries
  local key="smart-tuner:$RUN_ID:$1" n=0 end=$((SECONDS + CHECK_TIMEOUT_S))
  while :; do
    n=$(redis XLEN "$key" | tr -dc '0-9')
    [ "${n:-0}" -ge "$2" ] && break
    [ "$SECONDS" -gt "$end" ] || { sleep 2; continue; }
    fail "$key holds ${n:-0} entries after $CHECK_TIMEOUT_S s (expected >= $2)"
  done
  echo "[smoke]   $key: $n entries"
}
check() {  # check NAME ARGS...: scripts/compose_smoke_check.py inside the api container
  if ! compose exec -T -e SMOKE_CHECK_TIMEOUT_S="$CHECK_TIMEOUT_S" api python - "$@" \
      <scripts/compose_smoke_check.py | sed 's#^#[smoke]   #'; then
    fail "check $1"
  fi
}

wait_stream metrics 3
last=$(redis XREVRANGE "smart-tuner:$RUN_ID:metrics" + - COUNT 1 | grep -o '"step": *[0-9]*' \
  | head -n 1 || true)
echo "[smoke]   newest metrics message: ${last:-?}"
stage "trainer steps, metrics in Redis"
wait_stream attention 1
wait_stream diagnostics 1
stage "worker scores snapshots"
check runs "$RUN_ID"
stage "API answers /runs"
check targets trainer tuner diagnostics api notifier prometheus
rules=$(cat deploy/prometheus/rules/*.yml | grep -c -- "- alert:")
check rules "$rules"
stage "Prometheus targets up, rules loaded"
check command "$RUN_ID" "$api_token"
stage "API command acked by the trainer"
# The published port, from this host: docker-proxy forwards it even with --iptables=false
# on most hosts; informative only, as the checks above run inside the compose network.
if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "http://127.0.0.1:$api_port/healthz" 2>/dev/null; then
  echo "[smoke]   published port 127.0.0.1:$api_port (api): answers from the host"
else
  echo "[smoke]   published port 127.0.0.1:$api_port (api): no answer from the host (no docker-proxy route here)"
fi
# Non-root services, writable volumes, logs readable with docker-compose logs.
for service in trainer-cpu diagnostics tuner api notifier redis prometheus alertmanager; do
  uid=$(compose exec -T "$service" id -u | tr -dc '0-9')
  [ -n "$uid" ] && [ "$uid" != 0 ] || fail "$service runs as root (uid ${uid:-?})"
  lines=$(compose logs --no-color "$service" | grep -c "^${service}_1 *|" || true)
  [ "$lines" -gt 0 ] || fail "docker-compose logs $service shows nothing"
  echo "[smoke]   $service: uid $uid, $lines log lines"
done
checkpoints=$(compose exec -T trainer-cpu sh -c "ls /runs/$RUN_ID/checkpoints | grep -c '\.pt$'")
features=$(compose exec -T trainer-cpu sh -c "find /data/.features -type f | wc -l")
[ "${checkpoints//[!0-9]/}" -gt 0 ] && [ "${features//[!0-9]/}" -gt 0 ] \
  || fail "the trainer wrote no checkpoint to /runs or no features to /data/.features"
echo "[smoke]   volumes written: ${checkpoints//[!0-9]/} checkpoints in runs," \
  "${features//[!0-9]/} feature files in features"
stage "non-root, volumes, logs"
check alert GradNormRedFlag
stage "grad spike fires GradNormRedFlag"
check telegram GradNormRedFlag "$CHAT"
stage "alert reaches the Telegram stand-in"

# ---- stop, then down -v leaves nothing ---------------------------------------------------------
# SIGTERM, as `docker-compose stop` sends it: the trainer finishes its step, checkpoints and
# exits (it takes 15-20 s here, within its 2 min stop_grace_period); none may need a SIGKILL.
trainer_id=$(compose ps -q trainer-cpu)
compose stop --timeout 90
# shellcheck disable=SC2046
codes=$(docker inspect --format '{{.Name}} {{.State.ExitCode}}' $(compose ps -q))
echo "$codes" | sed 's#^/#[smoke]   exit code of #'
! grep -q " 137$" <<<"$codes" || fail "a service had to be killed (exit 137): $codes"
[ "$(docker inspect --format '{{.State.ExitCode}}' "$trainer_id")" = 0 ] \
  || fail "the trainer did not stop cleanly on SIGTERM"
stage "stop: every service ends on SIGTERM"
compose down -v --remove-orphans --timeout 20
filter="label=com.docker.compose.project=$PROJECT"
left="$(docker ps -aq --filter "$filter")$(docker volume ls -q --filter "$filter")"
left+="$(docker network ls -q --filter "$filter")"
[ -z "$left" ] || fail "down -v left something of $PROJECT: $left"
stage "down -v leaves nothing running"
trap - EXIT
rm -rf "$scratch"
echo "[smoke] passed in $(elapsed "$started") s"
