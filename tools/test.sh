#!/usr/bin/env bash
# Set up each dependency set and run the test suite in it: bash tools/test.sh [pytest args]
# 'latest' and 'host' (A1111 1.10.1's pins) run the whole suite; 'forge' (Forge's pins: gradio 4, fastapi 0.104,
# pydantic 2, transformers 4.46) and 'sdnext' (SD.Next's: gradio 3.43 on pydantic 2 and fastapi 0.124,
# transformers 5.13, diffusers 0.39) run the tab, host, API and service tests, the parts those versions change.
# Fails if any test fails in any set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash tools/setup-browser.sh
ui_tests=(tests/ui tests/host tests/browser tests/test_service.py tests/test_layout.py)
status=0
for set_name in latest host forge sdnext; do
  bash tools/setup.sh "$set_name"
  tests=()
  if [ "$set_name" = forge ] || [ "$set_name" = sdnext ]; then tests=("${ui_tests[@]}"); fi
  echo "=== tests with the '$set_name' dependency set"
  ".venv-$set_name/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@" || status=1
done
exit $status
