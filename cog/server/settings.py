"""What an operator chose for one cog server (``cog server``'s flags), as data."""

from __future__ import annotations

from pathlib import Path

import attrs

from cog.builders import BuilderSettings
from cog.package import PackageLimits


@attrs.frozen
class IngestOptions:
    """How uploads are built and checked."""

    #: boot the built image and run the package's examples before calling it ready
    check_images: bool = True
    check_timeout: float = 300.0
    #: builds running at once in this server; more wait for a slot
    max_concurrent_builds: int = 1
    #: build a package's architectures (CPU, GPU) at once, in one build slot
    concurrent_targets: bool = True
    #: a running build refreshes its record this often...
    heartbeat: float = 30.0
    #: ...so a "building" record older than this belongs to a server that died: rebuild
    stale_after: float = 120.0


@attrs.frozen
class PredictionOptions:
    """How the server runs models (``POST /v1/packages/<id>/predictions``)."""

    #: seconds a model's container stays up with no request before it is removed
    warm_for: float = 300.0
    #: model containers up at once; a request for another model waits for one to be free
    max_warm: int = 2
    #: requests waiting for a model at once; more are answered 503
    max_queue: int = 8
    #: seconds a model may take to start (pull, boot, setup())
    start_timeout: float = 300.0
    #: seconds one prediction may take; its container is removed after it
    timeout: float = 600.0
    #: largest multipart request (files included)
    max_form_bytes: int = 1024**3
    #: largest JSON request (files as data: URIs)
    max_json_bytes: int = 32 * 1024**2


@attrs.frozen
class ServerSettings:
    storage_url: str = "file:///var/lib/cog"
    #: builder entry-point name; None: store packages only, build no images
    builder: str | None = "docker"
    #: the image registry, the Docker Engine and the base images: for every builder, the
    #: check after a build and the names of images alike
    builder_settings: BuilderSettings = attrs.field(
        factory=lambda: BuilderSettings(registry="127.0.0.1:5000")
    )
    ingest: IngestOptions = attrs.field(factory=IngestOptions)
    #: where uploads are spooled, each server in a directory of its own under it (see
    #: cog.server.workdir); None: cog-server under the system's temp dir
    tmp_dir: Path | None = None
    max_upload_bytes: int = 4 * 1024**3
    #: seconds an upload may send nothing before it is cut off (408)
    upload_idle_timeout: float = 60.0
    package_limits: PackageLimits = attrs.field(factory=PackageLimits)
    #: how often the package index is refreshed from Storage (seconds)
    cache_ttl: float = 2.0
    predictions: PredictionOptions = attrs.field(factory=PredictionOptions)
    #: the tokens file (``NAME SCOPES SHA256`` lines, see cog.server.auth); None: no
    #: authentication, every caller may do everything
    tokens_file: Path | None = None
    #: callers without a token may read (list, show, download, logs)
    public_read: bool = False
