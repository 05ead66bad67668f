#!/usr/bin/env bash
# Create .venv (if missing) and install pixelllm-plugins with the given extras.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,serve,fiftyone,eval,ray
# torch is pinned to 2.13.0 here: on a machine without CUDA pip takes the CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build. Users with GPUs can install their own torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then  # every extra takes 2.7 GB (torch, fiftyone, ray); the tests add 1.2 GB for Label Studio
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt 6000000 ]; then
    echo "warning: only $((free_kb / 1024)) MB free here; the virtualenv with all extras and the tests' Label Studio need about 4 GB" \
         "(pip fails with 'No space left on device' when it runs out)" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
python -m pip install -q -e "$spec"
