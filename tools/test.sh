#!/usr/bin/env bash
# Set up both dependency sets and run the test suite in each: bash tools/test.sh [pytest args]
# Fails if any test fails in either set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash tools/setup-browser.sh
status=0
for set_name in latest host; do
  bash tools/setup.sh "$set_name"
  echo "=== tests with the '$set_name' dependency set"
  ".venv-$set_name/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
