#!/usr/bin/env bash
# Set up each dependency set and run the test suite in it: bash tools/test.sh [pytest args]
# 'latest' and 'host' (A1111 1.10.1's pins) run the whole suite; 'forge' (Forge's pins: gradio 4, fastapi 0.104,
# pydantic 2, transformers 4.46) runs the tab, host, API and service tests, the parts those versions change.
# Fails if any test fails in any set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash tools/setup-browser.sh
forge_tests=(tests/ui tests/host tests/browser tests/test_service.py tests/test_layout.py)
status=0
for set_name in latest host forge; do
  bash tools/setup.sh "$set_name"
  tests=()
  if [ "$set_name" = forge ]; then tests=("${forge_tests[@]}"); fi
  echo "=== tests with the '$set_name' dependency set"
  ".venv-$set_name/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@" || status=1
done
exit $status
