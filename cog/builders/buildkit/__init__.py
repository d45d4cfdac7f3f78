"""The BuildKit builder: builds through BuildKit's gRPC control API (``Solve``/``Status``).

Addresses (``--buildkit-addr``, i.e. ``options["addr"]``):

- ``tcp://host:1234`` — a standalone ``buildkitd``; TLS when ``tls_ca``/``tls_cert``/
  ``tls_key`` are given (mutual TLS with cert+key), ``tls_server_name`` to check another name.
- ``unix:///run/buildkit/buildkitd.sock`` — a ``buildkitd`` on this machine.
- ``docker-grpc://`` (the default) — the BuildKit embedded in the Docker Engine of
  ``--docker-host``/``DOCKER_HOST``/the local socket, reached through the Engine API's
  ``/grpc`` endpoint (an HTTP upgrade to h2c, as ``docker buildx``'s docker driver does);
  ``docker-grpc:///var/run/docker.sock`` or ``docker-grpc://host:2375`` name the engine.
  grpcio cannot do that upgrade, so a private unix socket (in a 0700 directory, never a TCP
  port: it gives the engine's root-equivalent access) accepts grpcio's connections and
  upgrades a fresh engine connection for each.

The build context reaches BuildKit with no client session: the builder serves the context
tar (made on the fly from the package zip, :mod:`cog.builders.context`) over HTTP at an
unguessable per-build URL (``/context/<256-bit token>``; unknown tokens are 404). The URL
answers until the build ends, not just once: the embedded BuildKit here fetches it once per
build, but nothing promises that of every BuildKit, and a refused second fetch would fail
the build. The Dockerfile frontend is told ``context=<that URL>``; BuildKit fetches and
unpacks it. By default that server listens on 127.0.0.1, which is right for the local
engine and a local buildkitd. For a remote buildkitd set
``context_host`` (an address of this machine the buildkitd can reach; the server listens
there), optionally ``context_port`` (default: any free port) — or ``context_url`` (the base
URL the buildkitd should use, e.g. behind a proxy) with ``context_listen=HOST:PORT``.

Export, by what the BuildKit at hand can do (``exporter=auto|image|moby``, default auto):

- ``image`` with ``push=true,name=<image>``: a standalone buildkitd pushes to the
  registry itself (``registry_insecure=true`` for a plain-HTTP registry); the digest is the
  one BuildKit reports.
- ``moby``: the embedded BuildKit (worker ``moby``) has no ``image`` exporter; it tags the
  image into the engine's store, then :func:`cog.builders.push.push_events` pushes it
  through the Engine API of that same engine and reports the registry's digest.
  ``auto`` picks ``moby`` for ``docker-grpc://`` or a worker that says it is moby.
  That engine: the one ``docker-grpc://`` names; for ``unix://``, this machine's
  (``--docker-host``) unless ``docker_host=`` says otherwise; for ``tcp://`` only
  ``docker_host=`` can say (another machine's engine), and a moby worker there without it
  is refused at the build's start rather than pushed from the wrong engine.

Registry cache: ``cache_from=<ref>[,<ref>...]`` and ``cache_to=<ref>`` add BuildKit
``registry`` cache imports/exports (``mode=max``).

Progress: ``Status`` runs next to ``Solve``; vertexes and their log lines become
``BuildLog(stage="build")`` lines as they arrive, like ``docker build --progress=plain``
(``#3 [2/6] RUN ...``, its output, ``#3 DONE 4.2s``/``CACHED``/``ERROR: ...``).

Cancellation: closing the event iterator cancels the ``Solve`` call; BuildKit cancels the
job and kills the running step. A build cancelled through its task (client gone, server
stopping) says so in its own log first: ``buildkit at ADDR: build cancelled during step
#7 [5/6] RUN ...``, then the cancellation goes on. ``close()`` under a running build
fails it with a :class:`BuilderUnavailable` naming the step.

Tested here against the BuildKit embedded in dockerd 20.10.24 (BuildKit ~v0.8, no ``Info``)
through ``docker-grpc://``; through a TLS terminator in front of it for ``tcp://`` with
mutual TLS; and through a plain unix socket to it for ``unix://``: probing, context
serving, live logs, failing steps, cancellation, the ``moby`` export plus Engine API push.
NOT tested (this machine has no standalone buildkitd): the ``image`` exporter with
``push=true``, ``registry_insecure``, registry cache import/export, and a real buildkitd
(newer BuildKit, ``Info``, OCI/containerd workers); that code follows BuildKit's
documented exporter and cache attributes.
"""

from __future__ import annotations

from cog.builders.buildkit.address import Address, parse_address
from cog.builders.buildkit.builder import BuildKitBuilder, BuildKitInfo, choose_exporter
from cog.builders.buildkit.connection import BuildKitConnection, TLSFiles
from cog.builders.buildkit.context_server import ContextServer
from cog.builders.buildkit.progress import Progress
from cog.builders.buildkit.tunnel import EngineTunnel

__all__ = [
    "Address",
    "BuildKitBuilder",
    "BuildKitConnection",
    "BuildKitInfo",
    "ContextServer",
    "EngineTunnel",
    "Progress",
    "TLSFiles",
    "choose_exporter",
    "parse_address",
]
