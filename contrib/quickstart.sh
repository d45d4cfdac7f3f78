#!/usr/bin/env bash
# The main job on a fresh machine: set it up, start a cog server, build examples/hello
# (images pushed to the local registry, examples checked in the built image), list and
# show it, and run an inference on it with `cog infer`. The server keeps running.
# Environment: COG_PORT (8080), COG_DATA (/tmp/cog-data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup-machine.sh
bash contrib/python-env.sh
export PATH="$PWD/.venv/bin:$PATH"

port=${COG_PORT:-8080}
data=${COG_DATA:-/tmp/cog-data}
url="http://localhost:$port"
if ! curl -fs "$url/ping" >/dev/null; then
    echo "quickstart: starting cog server on port $port (packages in $data, log /tmp/cog-server.log)"
    nohup cog server --port "$port" --storage "file://$data" \
        --docker-registry 127.0.0.1:5000 >/tmp/cog-server.log 2>&1 &
    for _ in $(seq 1 100); do curl -fs "$url/ping" >/dev/null && break; sleep 0.2; done
    curl -fs "$url/ping" >/dev/null || { echo "cog server did not start; see /tmp/cog-server.log"; exit 1; }
fi

set -x
cog remote set "$url"
(cd examples/hello && cog build) | tee /tmp/cog-build.log
id=$(awk '/^--> Built/ {print $NF}' /tmp/cog-build.log | tail -n 1)
cog list
cog show "$id"
cog infer "$id" -i name=quickstart -i punctuation=!
