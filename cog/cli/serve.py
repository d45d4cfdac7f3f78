"""`cog server`: run the cog server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cog import units
from cog.cli.output import CLIError


def parse_size(text: str) -> int:
    """'4G', '500MiB', '1048576' -> bytes (see cog.units)."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def default_storage() -> str:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return f"file://{Path(base) / 'cog'}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "server",
        help="run a cog server",
        description="Run the cog server: stores packages, builds and pushes their images.",
    )
    p.add_argument(
        "--host",
        help="address to listen on (default: 0.0.0.0 with --tokens; 127.0.0.1 without, as "
        "then anyone who can reach the server may change it)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument(
        "--storage",
        default=os.environ.get("COG_STORAGE") or default_storage(),
        help="where packages and records live: file:///path, s3://bucket/prefix?endpoint=URL, "
        "or a plugin's scheme (default: $COG_STORAGE or %(default)s)",
    )
    p.add_argument(
        "--docker-registry",
        default=os.environ.get("COG_DOCKER_REGISTRY", "127.0.0.1:5000"),
        help="registry the images are pushed to, host[:port][/path] (default: %(default)s)",
    )
    p.add_argument(
        "--builder",
        default="docker",
        help="image builder: docker, buildkit, a plugin's name, or none to only store "
        "packages (default: %(default)s)",
    )
    p.add_argument(
        "--builder-opt",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder-specific option (repeatable)",
    )
    p.add_argument(
        "--buildkit-addr",
        help="BuildKit address for --builder buildkit: tcp://host:1234, unix:///path, "
        "docker-grpc:///var/run/docker.sock",
    )
    p.add_argument("--buildkit-tls-ca", help="CA certificate for a tcp:// BuildKit")
    p.add_argument("--buildkit-tls-cert", help="client certificate for a tcp:// BuildKit")
    p.add_argument("--buildkit-tls-key", help="client key for a tcp:// BuildKit")
    p.add_argument(
        "--base-image",
        type=key_value,
        action="append",
        default=[],
        metavar="TARGET=IMAGE",
        help="base image template per target (cpu, gpu), with {python_version}, {cuda}, "
        "{cudnn}, {cudnn_major} and {nvidia_tag} (NVIDIA's tag for the CUDA/cuDNN pair) "
        "placeholders, "
        "e.g. cpu=registry.local/python:{python_version}-slim",
    )
    p.add_argument(
        "--gpu-strategy",
        choices=["wheels", "image"],
        default="wheels",
        help="GPU images: CUDA from NVIDIA's pip wheels on the CPU base (wheels), or an "
        "NVIDIA CUDA base image (image) (default: %(default)s)",
    )
    p.add_argument("--docker-host", help="Docker Engine address (default: $DOCKER_HOST or socket)")
    p.add_argument(
        "--registry-auth",
        type=Path,
        metavar="FILE",
        help="registry credentials in Docker's config.json format (its `auths`); default: "
        "Docker's own, $DOCKER_CONFIG/config.json or ~/.docker/config.json",
    )
    p.add_argument(
        "--max-upload-size",
        type=parse_size,
        default="4GiB",
        help="largest package zip accepted (default: %(default)s)",
    )
    # What an uploaded zip may expand to (cog.package.PackageLimits): zip-bomb limits.
    p.add_argument(
        "--max-unpacked-size",
        type=parse_size,
        default="8GiB",
        help="largest total size of a package's files once unpacked (default: %(default)s)",
    )
    p.add_argument(
        "--max-ratio",
        type=positive_float,
        default=200.0,
        help="largest unpacked size / zip size, enforced for packages that unpack to more "
        "than --ratio-threshold (default: %(default)s)",
    )
    p.add_argument(
        "--ratio-threshold",
        type=parse_size,
        default="64MiB",
        help="unpacked size from which --max-ratio applies (default: %(default)s)",
    )
    p.add_argument(
        "--max-members",
        type=positive_int,
        default=10_000,
        help="most entries in a package zip, directories included (default: %(default)s)",
    )
    p.add_argument(
        "--max-text-size",
        type=parse_size,
        default="16MiB",
        help="largest cog.yaml or model source the server reads (default: %(default)s)",
    )
    p.add_argument("--max-builds", type=int, default=1, help="builds at once (default: 1)")
    p.add_argument(
        "--targets-in-turn",
        action="store_true",
        help="build a package's CPU and GPU images one after the other (default: at once)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="do not boot built images and run their examples before calling them ready",
    )
    p.add_argument("--check-timeout", type=float, default=300.0, help="seconds (default: 300)")
    p.add_argument(
        "--stale-after",
        type=positive_float,
        default=120.0,
        help="seconds without a sign of life after which a build is taken for dead (its "
        "server stopped): taken over by an upload, marked failed otherwise; a running build "
        "refreshes its record every quarter of this, at most every 30 s (default: 120)",
    )
    p.add_argument(
        "--cache-ttl",
        type=float,
        default=2.0,
        help="seconds between refreshes of the package index from storage; how soon "
        "packages stored by other servers appear in listings (default: 2)",
    )
    # Predictions (POST /v1/packages/<id>/predictions): warm model containers.
    p.add_argument(
        "--warm-for",
        type=positive_float,
        default=300.0,
        help="seconds a model's container stays up after its last prediction (default: 300)",
    )
    p.add_argument(
        "--max-warm",
        type=positive_int,
        default=2,
        help="model containers up at once for predictions (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=8,
        help="predictions waiting for a model at once; more are answered 503 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--predict-timeout",
        type=positive_float,
        default=600.0,
        help="seconds one prediction may take (default: 600)",
    )
    p.add_argument(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="who may do what: lines of NAME SCOPES SHA256 (make them with `cog token new`); "
        "without it there is no authentication",
    )
    p.add_argument(
        "--public-read",
        action="store_true",
        help="with --tokens: callers without a token may list, show, download and read logs",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_float,
        default=15.0,
        help="seconds a client has to send a request's headers; also how long an idle "
        "connection stays open (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="connections open at once; more are closed as they come (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections-per-client",
        type=positive_int,
        default=64,
        help="connections open at once from one address (default: %(default)s)",
    )
    p.add_argument("--tmp-dir", type=Path, help="where uploads are spooled")
    p.add_argument(
        "--log-format", choices=["auto", "json", "console"], default="auto", help="server log"
    )
    p.set_defaults(func=run_server)


def settings_from_args(args: argparse.Namespace):
    from cog.builders import DEFAULT_BASE_IMAGES, BuilderSettings
    from cog.package import PackageLimits
    from cog.server.settings import IngestOptions, PredictionOptions, ServerSettings

    base_images = dict(DEFAULT_BASE_IMAGES)
    for target, image in args.base_image:
        if target not in base_images:
            raise CLIError(f"--base-image: unknown target {target!r} (use cpu or gpu)")
        base_images[target] = image
    options = dict(args.builder_opt)
    for option in ("addr", "tls_ca", "tls_cert", "tls_key"):
        value = getattr(args, f"buildkit_{option}")
        if value:
            options[option] = value
    builder = None if args.builder in ("none", "") else args.builder
    if args.public_read and args.tokens is None:
        raise CLIError("--public-read needs --tokens (without it every caller may do everything)")
    return ServerSettings(
        storage_url=args.storage,
        builder=builder,
        builder_settings=BuilderSettings(
            registry=args.docker_registry,
            base_images=base_images,
            gpu_strategy=args.gpu_strategy,
            docker_host=args.docker_host,
            options=options,
            registry_auth=args.registry_auth,
        ),
        ingest=IngestOptions(
            check_images=not args.no_check,
            check_timeout=args.check_timeout,
            max_concurrent_builds=args.max_builds,
            concurrent_targets=not args.targets_in_turn,
            stale_after=args.stale_after,
            heartbeat=min(30.0, args.stale_after / 4),
        ),
        tmp_dir=args.tmp_dir,
        max_upload_bytes=args.max_upload_size,
        package_limits=PackageLimits(
            max_members=args.max_members,
            max_uncompressed_bytes=args.max_unpacked_size,
            max_ratio=args.max_ratio,
            ratio_threshold_bytes=args.ratio_threshold,
            max_text_bytes=args.max_text_size,
        ),
        cache_ttl=args.cache_ttl,
        predictions=PredictionOptions(
            warm_for=args.warm_for,
            max_warm=args.max_warm,
            max_queue=args.max_queue,
            timeout=args.predict_timeout,
        ),
        tokens_file=args.tokens,
        public_read=args.public_read,
    )


def run_server(args: argparse.Namespace) -> int:
    from cog.builders import BuilderConfigError
    from cog.engine.auth import RegistryAuth, RegistryAuthError
    from cog.logs import configure_logging
    from cog.server.app import make_app
    from cog.server.auth import TokensFileError
    from cog.server.serving import ConnectionLimits, serve
    from cog.storage import StorageConfigError, StorageError

    configure_logging(args.log_format)
    try:
        settings = settings_from_args(args)
        RegistryAuth(settings.builder_settings.registry_auth).check()
        app = make_app(settings)
    except (BuilderConfigError, TokensFileError, RegistryAuthError) as exc:
        raise CLIError(str(exc)) from None
    host = args.host or ("0.0.0.0" if settings.tokens_file else "127.0.0.1")
    if settings.tokens_file is None:
        print(
            f"cog server: no --tokens: anyone who can reach {host}:{args.port} may upload, "
            "rebuild and delete packages",
            flush=True,
        )
    limits = ConnectionLimits(
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        max_per_client=args.max_connections_per_client,
    )
    try:
        serve(
            app,
            host,
            args.port,
            limits=limits,
            ready=lambda url: print(f"cog server listening on {url}", flush=True),
        )
    except (StorageConfigError, BuilderConfigError) as exc:
        raise CLIError(str(exc)) from None
    except StorageError as exc:
        raise CLIError(f"storage {settings.storage_url} is not usable: {exc}") from None
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{args.port}: {exc.strerror}") from None
    return 0
