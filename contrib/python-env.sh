#!/usr/bin/env bash
# Create ./.venv (if missing) and install cog with every extra into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[all]'
echo "python-env: $(.venv/bin/cog --version) in $(pwd)/.venv"
