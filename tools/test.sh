#!/usr/bin/env bash
# Set up each dependency set and run the test suite in it: bash tools/test.sh [pytest args]
# 'latest' and 'host' (A1111 1.10.1's pins) run the whole suite; 'forge' (Forge's pins: gradio 4, fastapi 0.104,
# pydantic 2, transformers 4.46) and 'sdnext' (SD.Next's: gradio 3.43 on pydantic 2 and fastapi 0.124,
# transformers 5.13, diffusers 0.39) and 'neo' (Forge Neo's: gradio 4.40 on fastapi 0.127, pydantic 2.10, numpy 2,
# transformers 4.56, diffusers 0.36) run the tab, host, API and service tests, the parts those versions change.
# Forge Classic pins what A1111 1.10.1 pins (gradio 3.41.2, transformers 4.30.2, pydantic 1): the 'host' set.
# Fails if any test fails in any set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash tools/setup-browser.sh
ui_tests=(tests/ui tests/host tests/browser tests/test_service.py tests/test_layout.py)
status=0
for set_name in latest host forge sdnext neo; do
  bash tools/setup.sh "$set_name"
  tests=()
  if [ "$set_name" != latest ] && [ "$set_name" != host ]; then tests=("${ui_tests[@]}"); fi
  # The world's measured outcomes (five training runs, minutes) run once, in 'latest'; 'host' keeps the world's
  # build, evaluator and scene tests, which exercise the same code under A1111's pins.
  if [ "$set_name" = host ]; then tests=(--ignore=tests/world/test_world_outcomes.py); fi
  # The browser test trains the demo to the end (minutes) in 'latest'; elsewhere 510 steps (one sampling) show
  # that set's gradio front end runs, samples, cancels and reloads.
  if [ "$set_name" = latest ]; then unset DB_BROWSER_TRAIN_STEPS; else export DB_BROWSER_TRAIN_STEPS=510; fi
  echo "=== tests with the '$set_name' dependency set"
  # pytest-xdist: one worker per core (a module's tests stay on one worker, so its fixtures are built once).
  ".venv-$set_name/bin/python" -m pytest -q -p no:cacheprovider -n auto --dist loadfile "${tests[@]}" "$@" || status=1
done
exit $status
