#!/usr/bin/env bash
# The whole test suite on a fresh machine: install everything the tests need, then run pytest.
# Installs: the package with all extras (.venv), Debian chromium (headless screenshots; needs root or
# sudo), Label Studio 1.23.2 in its own virtualenv (.ci-cache/ls-venv). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,serve,fiftyone,eval,ray
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed; screenshot tests will skip"
  elif command -v sudo >/dev/null 2>&1; then
    (sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed"
  fi
fi
if [ -f scripts/ensure_label_studio.sh ]; then
  bash scripts/ensure_label_studio.sh
fi
. .venv/bin/activate
ruff check .
export PIXELLLM_TEST_METEOR=1  # Java METEOR is part of the suite (needs java on PATH)
python -m pytest -q -p no:cacheprovider "$@"
