#!/usr/bin/env bash
# The demo on a fresh machine: set up, speak the demo corpus, run the whole system (Redis,
# diagnostics worker, tuner + control API, supervised trainer) until the success indicators
# are met (the plan's five and the inference probes), then synthesise a sentence in each
# language with the checkpoint that spoke the probes best.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/demo}
.venv/bin/smart-tuner corpus --out data/demo
.venv/bin/smart-tuner up --data data/demo --out "$RUN" --until-indicators \
  --max-steps "${MAX_STEPS:-1000}"
.venv/bin/smart-tuner synthesize --checkpoint "$RUN" --best \
  --text "The quick brown fox jumps over the lazy dog." --out "$RUN/sample-en.wav"
.venv/bin/smart-tuner synthesize --checkpoint "$RUN" --best \
  --text "Съешь же ещё этих мягких французских булок." --out "$RUN/sample-ru.wav"
echo "demo done: see $RUN/summary.json, $RUN/plots/ and $RUN/sample-*.wav"
