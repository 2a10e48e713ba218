#!/usr/bin/env bash
# The demo on a fresh machine: set up, speak the demo corpus, run the whole system (Redis,
# diagnostics worker, tuner + control API, supervised trainer) until the plan's five success
# indicators are met, then synthesise a sentence in each language from the trained model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/demo}
.venv/bin/smart-tuner corpus --out data/demo
.venv/bin/smart-tuner up --data data/demo --out "$RUN" --until-indicators \
  --max-steps "${MAX_STEPS:-1000}"
.venv/bin/smart-tuner synthesize --checkpoint "$RUN" \
  --text "The quick brown fox jumps over the lazy dog." --out "$RUN/sample-en.wav"
.venv/bin/smart-tuner synthesize --checkpoint "$RUN" \
  --text "Съешь же ещё этих мягких французских булок." --out "$RUN/sample-ru.wav"
echo "demo done: see $RUN/summary.json, $RUN/plots/ and $RUN/sample-*.wav"
