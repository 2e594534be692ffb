#!/usr/bin/env bash
# `make python-venv`: the Python virtual environment with the OpenAI and Anthropic SDKs used by
# e2e/tests/openai_sdk.rs and e2e/tests/anthropic_sdk.rs, at $FLOODGATE_VENV (default ~/.cache/floodgate/venv). Idempotent: it
# installs only when requirements.txt differs from what the environment was built from.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${FLOODGATE_VENV:-$HOME/.cache/floodgate/venv}
stamp=$venv/floodgate-requirements.txt

if [[ -x $venv/bin/python ]] && cmp -s "$here/requirements.txt" "$stamp"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "python-venv: python3 not found: install Python 3.9+" >&2; exit 1; }
echo "python-venv: installing $(grep -v '^#' "$here/requirements.txt" | xargs) into $venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cp "$here/requirements.txt" "$stamp"
