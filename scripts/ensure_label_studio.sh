#!/usr/bin/env bash
# Build (once) and reuse a virtualenv holding Label Studio 1.23.2, for the end-to-end tests of the
# Label Studio ML backend. Label Studio is a test fixture, never a runtime dependency of the project.
#
#   scripts/ensure_label_studio.sh            # prints the venv path on the last line of stdout
#
# Environment:
#   LS_VENV      where the venv lives (default: <repo>/.ci-cache/ls-venv, git-ignored)
#   LS_VERSION   Label Studio version (default 1.23.2)
#   LS_PYTHON    interpreter used to create the venv (default: python3.11, else python3)
#   LS_EXTRAS    extra packages for the test driver (default: playwright==1.65.2, which drives Debian's
#                /usr/bin/chromium in the browser check; no browser is downloaded). LS_EXTRAS= skips them.
#   LS_FORCE=1   rebuild even if a complete venv exists
#
# A venv counts as complete only when its marker file names the same version and `label-studio`
# imports; a half-built venv (interrupted install) is removed and rebuilt. A lock serialises
# concurrent callers (pytest-xdist workers, two CI steps).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
LS_VERSION="${LS_VERSION:-1.23.2}"
LS_VENV="${LS_VENV:-$repo/.ci-cache/ls-venv}"
LS_EXTRAS="${LS_EXTRAS-playwright==1.65.2}"
marker="$LS_VENV/.pixelllm-ls-complete"

if [[ -z "${LS_PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then LS_PYTHON=python3.11; else LS_PYTHON=python3; fi
fi

is_complete() {
  [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "label-studio==$LS_VERSION" ]] \
    && "$LS_VENV/bin/python" -c "import label_studio, label_studio_sdk" >/dev/null 2>&1
}

mkdir -p "$(dirname "$LS_VENV")"
exec 9>"$LS_VENV.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

pip_install() {
  # pip's output goes to stderr, without the per-package warnings some pip configs print
  local rc
  set +e
  "$LS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" >&2; true; }
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

extras_ok() {
  local pkg
  for pkg in $LS_EXTRAS; do
    "$LS_VENV/bin/python" -m pip show --disable-pip-version-check "${pkg%%[=<>]*}" >/dev/null 2>&1 || return 1
  done
}

if [[ "${LS_FORCE:-0}" != "1" ]] && is_complete; then
  if [[ -n "$LS_EXTRAS" ]] && ! extras_ok; then
    echo "adding $LS_EXTRAS to $LS_VENV" >&2
    pip_install $LS_EXTRAS
  fi
  echo "label-studio==$LS_VERSION already built in $LS_VENV" >&2
  echo "$LS_VENV"
  exit 0
fi

start=$(date +%s)
echo "building label-studio==$LS_VERSION in $LS_VENV with $LS_PYTHON ..." >&2
rm -rf "$LS_VENV"
"$LS_PYTHON" -m venv "$LS_VENV"
pip_install --upgrade pip
# shellcheck disable=SC2086  # LS_EXTRAS is a space-separated list on purpose
pip_install "label-studio==$LS_VERSION" $LS_EXTRAS
"$LS_VENV/bin/python" -c "import label_studio, label_studio_sdk" >&2
echo "label-studio==$LS_VERSION" > "$marker"
echo "built label-studio==$LS_VERSION in $(( $(date +%s) - start )) s" >&2
echo "$LS_VENV"
