#!/usr/bin/env bash
# The test command: install what the tests need, start the real services (dockerd, the
# registry, base images; SeaweedFS is started by the tests), run every test.
# Extra arguments go to pytest, e.g. `bash contrib/test.sh -m "not integration and not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup-machine.sh
bash contrib/python-env.sh
exec .venv/bin/python -m pytest "$@"
