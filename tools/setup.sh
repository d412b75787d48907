#!/usr/bin/env bash
# Create (or reuse) a virtual environment for one dependency set: tools/setup.sh latest|host|forge|sdnext
# torch 2.13.0 is installed first and pinned by tools/constraints.txt so no later install can replace it
# (any other torch pulls gigabytes of CUDA wheels).
set -euo pipefail
set_name=${1:-latest}
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-$set_name"
reqs="$root/tools/requirements-$set_name.txt"
nodeps="$root/tools/requirements-$set_name-nodeps.txt"  # optional: installed as the host does, without dependencies
stamp="$venv/.requirements.sha"
want=$(cat "$reqs" "$root/tools/constraints.txt" $( [ -f "$nodeps" ] && echo "$nodeps" ) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q -c "$root/tools/constraints.txt" torch==2.13.0
"$venv/bin/python" -m pip install -q -c "$root/tools/constraints.txt" -r "$reqs"
if [ -f "$nodeps" ]; then
  "$venv/bin/python" -m pip install -q --no-deps -r "$nodeps"
fi
# open_clip_torch only provides the CLIP BPE file the tokenizer test rebuilds from; its dependencies would pull
# torchvision, whose only 2.13 build is CUDA-linked and breaks transformers' image imports on CPU.
"$venv/bin/python" -m pip install -q --no-deps open_clip_torch
"$venv/bin/python" -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true
echo "$want" > "$stamp"
