#!/usr/bin/env bash
# Set up the real services cog uses, on a Debian bookworm machine whose only outside network
# is the Debian and PyPI mirrors. Idempotent: what is already there is left alone.
#
#   - Debian's docker.io (dockerd) running, log in /var/log/cog/dockerd.log
#   - Debian's docker-registry (CNCF distribution) on 127.0.0.1:5000, no auth
#   - Debian's chromium (and chromium-driver), headless, for the tests of the web page
#   - base images built locally (Docker Hub is not reachable), one per Python that Debian's
#     suites ship: a debootstrap'd suite with python3, pip and venv, tagged like the
#     registry's images so cog's default CPU base resolves (bullseye: python:3.9-slim,
#     bookworm: python:3.11-slim, trixie: python:3.13-slim). The site's extra CA
#     certificates (/usr/local/share/ca-certificates) go into them, so `pip install` works
#     behind a TLS-intercepting proxy. The mirror is the machine's own (its apt sources),
#     or else debootstrap's default.
#
# Environment: COG_REGISTRY_PORT (5000), COG_BASE_IMAGES (suite=tag[,tag] ..., as above),
# COG_DEBIAN_MIRROR (from /etc/apt/sources*), COG_STATE_DIR (/var/lib/cog-services).
set -euo pipefail

state=${COG_STATE_DIR:-/var/lib/cog-services}
logs=/var/log/cog
registry_port=${COG_REGISTRY_PORT:-5000}
base_images=${COG_BASE_IMAGES:-bullseye=python:3.9-slim bookworm=python:3.11-slim trixie=python:3.13-slim}
mkdir -p "$state" "$logs"

say() { echo "setup-machine: $*"; }

mirror() {
    if [ -n "${COG_DEBIAN_MIRROR:-}" ]; then echo "$COG_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -rhoE '(URIs:|^deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | grep -v security | head -n 1 || true)
    echo "$uri"  # none: debootstrap's default
}

# -- packages ---------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
# the browser the page's tests drive headless (through Playwright, never its own download)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages try to start services through systemd, which may not run here.

# -- dockerd ----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    nohup dockerd >>"$logs/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { say "dockerd did not start; see $logs/dockerd.log"; exit 1; }
fi
say "dockerd $(docker version --format '{{.Server.Version}}' 2>/dev/null) is running"

# -- registry ---------------------------------------------------------------------------
registry_up() { curl -fs -o /dev/null "http://127.0.0.1:$registry_port/v2/"; }
if ! registry_up; then
    say "starting docker-registry on 127.0.0.1:$registry_port"
    mkdir -p "$state/registry"
    cat >"$state/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $state/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$registry_port
EOF
    nohup docker-registry serve "$state/registry.yml" >>"$logs/registry.log" 2>&1 &
    for _ in $(seq 1 40); do registry_up && break; sleep 0.25; done
    registry_up || { say "the registry did not start; see $logs/registry.log"; exit 1; }
fi
say "registry answers on 127.0.0.1:$registry_port"

# -- base images ------------------------------------------------------------------------
# One per Python that Debian's suites ship, tagged as the registry's images are. A suite's
# image is built only when one of its tags is missing; its root file system is kept (as a
# tarball under $state) and rebuilt only when the site's extra CA certificates change.
build_base() {
    local suite=$1 tags=$2 tag need=false
    for tag in ${tags//,/ }; do
        docker image inspect "$tag" >/dev/null 2>&1 || need=true
    done
    $need || return 0
    local tarball="$state/$suite-python3.tar" certs_sum from
    # (none is fine too: under pipefail a failing cat would end the script here)
    certs_sum=$( (cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true) | sha256sum | cut -c1-12)
    if [ ! -s "$tarball" ] || [ "$(cat "$tarball.certs" 2>/dev/null)" != "$certs_sum" ]; then
        from=$(mirror)
        rootfs=$(mktemp -d "$state/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        say "debootstrap $suite from ${from:-the default mirror of debootstrap} (a minute or two)"
        # shellcheck disable=SC2086  # no mirror: debootstrap's own default
        debootstrap --variant=minbase \
            --include=python3,python3-pip,python3-venv,ca-certificates \
            "$suite" "$rootfs" $from >"$logs/debootstrap-$suite.log" 2>&1 \
            || { say "debootstrap $suite failed; see $logs/debootstrap-$suite.log"; exit 1; }
        rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
        ln -sf python3 "$rootfs/usr/bin/python"
        if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        fi
        # Keep the image small: no apt lists or docs.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
        tar -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        echo "$certs_sum" >"$tarball.certs"
        rm -rf "$rootfs"
        trap - EXIT
    fi
    local first="" python wanted
    for tag in ${tags//,/ }; do
        if [ -z "$first" ]; then
            docker import \
                --change 'ENV LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore' \
                --change 'CMD ["python3"]' "$tarball" "$tag" >/dev/null
            first=$tag
        else
            docker tag "$first" "$tag"
        fi
        # A tag never names another Python than the image runs (python:3.9-slim runs 3.9).
        wanted=$(echo "$tag" | sed -nE 's/.*:([0-9]+\.[0-9]+)(-.*)?$/\1/p')
        python=$(docker run --rm "$tag" python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        if [ -n "$wanted" ] && [ "$python" != "$wanted" ]; then
            docker rmi "$tag" >/dev/null
            say "$suite's Python is $python, not $wanted: not tagged $tag; see COG_BASE_IMAGES"
            exit 1
        fi
        say "base image $tag (Debian $suite, Python $python) created from $tarball"
    done
}

for entry in $base_images; do
    build_base "${entry%%=*}" "${entry#*=}"
done
say "base images present: $(echo "$base_images" | sed -E 's/[a-z]+=//g; s/,/ /g')"
