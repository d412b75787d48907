#!/usr/bin/env bash
# Set up the latest dependency set and start the standalone app with the demo model: bash tools/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/tools/setup.sh" latest
cd "$root"
exec .venv-latest/bin/python -m dreambooth serve "$@"
