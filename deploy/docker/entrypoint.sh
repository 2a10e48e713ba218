#!/bin/sh
# Entry point of the Smart Tuner image: drop every SMART_TUNER_* variable that is set but
# empty, then run the command.
#
# .env.example leaves the secrets empty (SMART_TUNER_API_TOKEN=, ...) and docker-compose
# passes such a line on as a variable set to "". The settings classes would read "" as a
# value (and refuse it: a token is at least 16 characters, a thread count an integer);
# unset, they use their default, which is what an empty line in .env means.
set -eu
for name in $(env | sed -n 's/^\(SMART_TUNER_[A-Za-z0-9_]*\)=$/\1/p'); do
  # The name matched [A-Za-z0-9_] only, so eval sees nothing but a variable reference.
  eval "value=\${$name-}"
  if [ -z "$value" ]; then
    unset "$name"
  fi
done
exec "$@"
