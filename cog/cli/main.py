"""The `cog` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import cog
from cog.cli import serve
from cog.cli.output import (
    CLIError,
    Progress,
    parse_time,
    style,
    table,
    time_ago,
)
from cog.cli.remote import current_remote, current_token, forget_token, save_remote, save_token
from cog.events import plain
from cog.tls import import_aiohttp
from cog.units import format_size


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.func is not serve.run_server:
        # The client's verbs talk plain HTTP but to an https:// server (RegistryClient
        # loads the certificates then): aiohttp's 0.1 s of them at import is put off.
        import_aiohttp()
    try:
        return args.func(args) or 0
    except CLIError as exc:
        print(f"cog: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cog: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cog list | head`
        return 0
    except OSError as exc:  # a local file we cannot read or write (-o, a model directory)
        print(f"cog: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError) -> str:
    """'/x/y.zip: No such file or directory', without Python's [Errno 2] noise."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    return f"{names}: {reason}"


NO_CACHE_HELP = (
    "build every step again, using no cached layer (a package built already is built again)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cog", description="Package machine learning models and run them anywhere."
    )
    parser.add_argument("--version", action="version", version=f"cog {cog.__version__}")
    parser.add_argument(
        "--remote", help="cog server URL for this command (default: $COG_REMOTE or saved)"
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    serve.add_parser(sub)

    remote = sub.add_parser("remote", help="set or show which cog server to use")
    remote_sub = remote.add_subparsers(metavar="ACTION")
    p = remote_sub.add_parser("set", help="save the server URL")
    p.add_argument("url")
    p.set_defaults(func=remote_set)
    p = remote_sub.add_parser("show", help="print the server URL in use")
    p.set_defaults(func=remote_show)
    remote.set_defaults(func=remote_show)

    p = sub.add_parser("login", help="save a token for the cog server in use")
    p.add_argument(
        "--token-stdin", action="store_true", help="read the token from stdin, not a prompt"
    )
    p.set_defaults(func=lambda a: run(login(a)))
    p = sub.add_parser("logout", help="forget the token saved for the cog server in use")
    p.set_defaults(func=logout)
    p = sub.add_parser("whoami", help="who the cog server takes you for, and what you may do")
    p.set_defaults(func=lambda a: run(whoami(a)))

    token = sub.add_parser("token", help="make tokens for a cog server's tokens file")
    token_sub = token.add_subparsers(metavar="ACTION")
    p = token_sub.add_parser(
        "new",
        help="print a new random token and its line for the server's --tokens file",
        description="Print a new random token (give it to its user) and the line to add to "
        "the server's tokens file, which holds only the token's SHA-256.",
    )
    p.add_argument("name", help="who the token is for: named in the access log and records")
    p.add_argument(
        "--scopes",
        default="read",
        help="comma-separated from read (list, show, download, logs), write (upload, "
        "rebuild), admin (delete) (default: %(default)s)",
    )
    p.set_defaults(func=token_new)
    token.set_defaults(func=lambda a: token.print_help() or 2)

    p = sub.add_parser("build", help="package a directory, upload it, build its images")
    p.add_argument("dir", nargs="?", default=".", help="model directory (default: .)")
    p.add_argument("--json", action="store_true", help="print the package document at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    p.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    p.set_defaults(func=lambda a: run(build(a)))

    p = sub.add_parser("rebuild", help="build a stored package's images again")
    p.add_argument("id", help="package ID or unique prefix (7+ characters)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    p.set_defaults(func=lambda a: run(rebuild(a)))

    p = sub.add_parser("list", help="list packages, newest first")
    p.add_argument("--json", action="store_true", help="the API document")
    p.set_defaults(func=lambda a: run(list_packages(a)))

    p = sub.add_parser("show", help="show a package")
    p.add_argument("id", help="package ID or unique prefix (7+ characters)")
    p.add_argument("--json", action="store_true", help="the API document")
    p.set_defaults(func=lambda a: run(show(a)))

    p = sub.add_parser("download", help="download a package zip (the exact stored bytes)")
    p.add_argument("id")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="file to write, or a directory to write NAME-ID.zip into (default: NAME-ID.zip)",
    )
    p.set_defaults(func=lambda a: run(download(a)))

    p = sub.add_parser("delete", help="delete a package (its images stay in the registry)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the API's answer")
    p.set_defaults(func=lambda a: run(delete(a)))

    p = sub.add_parser("logs", help="print a package's build log (follows a running build)")
    p.add_argument("id")
    p.set_defaults(func=lambda a: run(logs(a)))

    for verb in ("infer", "predict"):  # predict: what Cog's users type
        p = sub.add_parser(
            verb,
            help="run an inference on a package's image, locally (or on the server)"
            + (" (the same as infer)" if verb == "predict" else ""),
        )
        p.add_argument("id")
        p.add_argument(
            "-i",
            "--input",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="an input: name=value, name=@file, or a bare value/@file for the main input; "
            "naming a list input again adds to it",
        )
        p.add_argument("-o", "--output", type=Path, help="where to write a file output")
        p.add_argument("--docker-host", help="Docker Engine to run on (default: $DOCKER_HOST)")
        p.add_argument(
            "--remote",
            dest="on_server",
            action="store_true",
            help="run it on the cog server's Docker Engine instead of the local one",
        )
        p.set_defaults(func=lambda a: run(infer(a)))
    return parser


def run(coro: Coroutine[Any, Any, int | None]) -> int:
    return asyncio.run(coro) or 0


def client(args: argparse.Namespace, token: str | None = None):
    from cog.cli.client import RegistryClient

    url, source = current_remote(args.remote)
    if source == "default":
        print(
            f"cog: using the cog server at {url} (no remote is set; choose one with "
            "`cog remote set URL`)",
            file=sys.stderr,
        )
    return RegistryClient(url, token=token or current_token(url)[0])


def default_name(directory: Path) -> str | None:
    """The name of a package whose cog.yaml has none: its directory's, as an image name
    (lowercase letters and digits, other characters as '-'); None if nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", directory.name.lower()).strip("-") or None


# -- tokens ---------------------------------------------------------------------------


def token_new(args: argparse.Namespace) -> int:
    from cog.server.auth import TokenEntry, check_token_name, new_token, parse_scopes, token_digest

    try:
        name = check_token_name(args.name)
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    token = new_token()
    line = TokenEntry(name, scopes, token_digest(token)).line()
    print(f"Token for {name} (shown only now; give it to its user, keep it secret):")
    print(token)
    print("Add this line to the server's --tokens file (it holds no secret):")
    print(line)
    return 0


async def login(args: argparse.Namespace) -> int:
    import getpass

    url = current_remote(args.remote)[0]
    if args.token_stdin or not sys.stdin.isatty():
        token = sys.stdin.readline().strip()
    else:
        token = getpass.getpass(f"Token for {url}: ").strip()
    if not token:
        raise CLIError("no token given")
    async with client(args, token) as registry:
        me = await registry.whoami()  # a refused token ends here (401), nothing saved
    save_token(url, token)
    if me.get("Anonymous"):
        print(f"Saved a token for {url} (that server does not check tokens at present)")
    else:
        scopes = ", ".join(me.get("Scopes") or []) or "no scopes"
        print(f"Logged in to {url} as {me.get('Name')} ({scopes})")
    return 0


def logout(args: argparse.Namespace) -> int:
    url = current_remote(args.remote)[0]
    if forget_token(url):
        print(f"Logged out of {url}")
    else:
        print(f"No token was saved for {url}")
    return 0


async def whoami(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        me = await registry.whoami()
    scopes = ", ".join(me.get("Scopes") or []) or "none"
    print(f"{me.get('Name')} at {registry.base_url} (scopes: {scopes})")
    return 0


# -- remote ---------------------------------------------------------------------------


def remote_set(args: argparse.Namespace) -> int:
    url = save_remote(args.url)
    print(f"Remote set to {url}")
    return 0


def remote_show(args: argparse.Namespace) -> int:
    url, source = current_remote(args.remote)
    print(url if source != "default" else f"{url} (default; set one with `cog remote set URL`)")
    return 0


# -- build ----------------------------------------------------------------------------


async def build(args: argparse.Namespace) -> int:
    from cog.package import PackageError, plan_package

    root = Path(args.dir).resolve()
    if not (root / "cog.yaml").is_file():
        raise CLIError(f"no cog.yaml in {root}")
    # Zipped as it is sent: the files are read (twice: a member's CRC precedes its data)
    # and the zip never touches the disk.
    try:
        plan = await asyncio.to_thread(plan_package, root)
    except PackageError as exc:
        raise CLIError(str(exc)) from None
    async with client(args) as registry:
        bar = Progress("Uploading", plan.size)
        stream = registry.upload_package(
            plan, bar.update, name=default_name(root), no_cache=args.no_cache
        )
        return await render_build(stream, args, on_first_event=bar.close)


async def rebuild(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        return await render_build(registry.rebuild(args.id, no_cache=args.no_cache), args)


async def render_build(
    stream: AsyncIterator[dict[str, Any]],
    args: argparse.Namespace,
    on_first_event: Callable[[], None] | None = None,
) -> int:
    """Print build events as they arrive; the exit code from the final event."""
    final: dict[str, Any] | None = None
    async for event in stream:
        if on_first_event:
            on_first_event()
            on_first_event = None
        kind = event["type"]
        if kind in ("package", "error"):
            final = event
        elif not args.quiet:
            print_event(event)
    if on_first_event:
        on_first_event()
    if final is None:
        raise CLIError("the server ended the build without a result; see `cog logs ID`")
    if final["type"] == "error":
        raise CLIError(final["message"])
    document = final["package"]
    if args.json:
        print(json.dumps(document, indent=2))
    elif document.get("Artifacts"):
        print(style(f"--> Built and pushed {document['ID']}", "bold", "green"))
    else:
        print(style(f"--> Built {document['ID']}", "bold", "green"))
    return 0


def print_event(event: dict[str, Any]) -> None:
    # plain(): what a build or a model printed never reaches the terminal as codes.
    if event["type"] == "status":
        print(style(f"--> {plain(event['message'])}", "bold"), flush=True)
    elif event["type"] == "log":
        where = "/".join(p for p in (event.get("target"), event.get("stage")) if p)
        colour = ("red",) if event.get("stage") == "error" else ("dim",)
        print(f"{style(f'[{plain(where)}]', *colour)} {plain(event['line'])}", flush=True)


async def logs(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        async for event in registry.log(args.id):
            if event["type"] in ("status", "log"):
                print_event(event)
            elif event["type"] == "error":
                print(style(f"--> Failed: {event['message']}", "bold", "red"))
            elif event["type"] == "package":
                print(style(f"--> Built {event['package']['ID']}", "bold", "green"))
    return 0


# -- packages -------------------------------------------------------------------------


async def list_packages(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        packages = await registry.list()
    if args.json:
        print(json.dumps(packages, indent=2))
        return 0
    rows = [
        (p["ID"][:12], p["Name"], p.get("Status", ""), time_ago(parse_time(p["Created"])))
        for p in packages
    ]
    print(table(rows, ("ID", "NAME", "STATUS", "CREATED")))
    return 0


async def show(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        package = await registry.show(args.id)
    if args.json:
        print(json.dumps(package, indent=2))
        return 0
    print(describe(package))
    return 0


def describe(package: dict[str, Any]) -> str:
    config = package.get("Config") or {}
    env = config.get("Environment") or {}
    lines = [
        f"{style('ID:', 'bold')}       {package['ID']}",
        f"{style('Name:', 'bold')}     {package['Name']}",
        f"{style('Status:', 'bold')}   {package.get('Status', '')}"
        + (f" ({package['Error']})" if package.get("Error") else ""),
        f"{style('Created:', 'bold')}  {package['Created']} "
        f"({time_ago(parse_time(package['Created']))})",
        f"{style('Size:', 'bold')}     {format_size(package.get('Size') or 0)}",
        f"{style('Model:', 'bold')}    {config.get('Model', '')}",
        f"{style('Python:', 'bold')}   {env.get('PythonVersion', '')}",
        f"{style('Arch:', 'bold')}     {', '.join(env.get('Architectures') or [])}"
        + (f" (CUDA {env['CUDA']}, cuDNN {env['CuDNN']})" if env.get("CUDA") else ""),
    ]
    for label, key in (
        ("Packages", "PythonPackages"),
        ("Requires", "PythonRequirements"),
        ("System", "SystemPackages"),
    ):
        value = env.get(key)
        if value:
            text = value if isinstance(value, str) else ", ".join(value)
            lines.append(f"{style(label + ':', 'bold')} {text}")
    artifacts = package.get("Artifacts") or []
    if artifacts:
        lines.append(style("Images:", "bold"))
        lines += [f"  {a['Target']:<11} {a['URI']}" for a in artifacts]
    if config.get("Concurrency", 1) > 1:
        lines.append(f"{style('Concurrency:', 'bold')} {config['Concurrency']}")
    for label, values in (
        ("Run", env.get("Run")),
        ("Env", config.get("EnvironmentVariables")),
    ):
        if values:
            lines.append(f"{style(label + ':', 'bold')}      {'; '.join(values)}")
    signature = package.get("Signature") or {}
    arguments = signature.get("arguments") or {}
    if arguments:
        lines.append(style("Inputs:", "bold"))
        for name, spec in arguments.items():
            extras = [
                f"{key}={spec[key]!r}"
                for key in ("default", "min", "max", "options", "min_length", "max_length", "regex")
                if spec.get(key) is not None
            ]
            if spec.get("deprecated"):
                extras.append("deprecated")
            kind = ", ".join([describe_type(spec), *extras])
            help_text = f"  {spec['help']}" if spec.get("help") else ""
            lines.append(f"  {name} ({kind}){help_text}")
    if signature.get("output"):
        lines.append(f"{style('Output:', 'bold')}   {describe_type(signature['output'])}")
    return "\n".join(lines)


def describe_type(spec: dict[str, Any]) -> str:
    """A signature's type as Python spells it: list[Path], Iterator[str], Output{...}."""
    if spec.get("type") == "object":
        fields = ", ".join(f"{k}: {describe_type(v)}" for k, v in spec.get("fields", {}).items())
        text = f"{spec.get('name') or 'object'} {{{fields}}}"
    else:
        text = str(spec.get("type"))
    if spec.get("list"):
        text = f"list[{text}]"
    if spec.get("concatenate"):
        text = f"ConcatenateIterator[{text}]"
    elif spec.get("iterator"):
        text = f"Iterator[{text}]"
    if spec.get("optional"):
        text = f"Optional[{text}]"
    return text


async def download(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        bar = Progress("Downloading", 1)
        try:
            path, package_id = await registry.download(args.id, args.output, bar.update)
        finally:
            bar.close()
    print(f"Downloaded {package_id[:12]} to {path}")
    return 0


async def delete(args: argparse.Namespace) -> int:
    async with client(args) as registry:
        result = await registry.delete(args.id)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Deleted {result['ID']}")
    return 0


async def infer(args: argparse.Namespace) -> int:
    from cog.cli.infer import InferenceError, run_inference
    from cog.cli.output import is_tty

    if args.on_server:
        return await infer_on_server(args)
    async with client(args) as registry:
        package = await registry.show(args.id)
    artifacts = {a["Target"]: a["URI"] for a in package.get("Artifacts") or []}
    image = artifacts.get("docker-cpu") or artifacts.get("docker-gpu")
    if image is None:
        raise CLIError(
            f"package {package['ID'][:12]} has no image (status: {package.get('Status')}"
            f"{'; ' + package['Error'] if package.get('Error') else ''})"
        )
    if package.get("Status") not in (None, "ready"):
        # e.g. built and pushed, then its check failed: the image may not work.
        print(f"cog: warning: {not_ready(package)}; running its image anyway", file=sys.stderr)

    def progress(line: str) -> None:
        if is_tty(sys.stderr):
            print(style(line, "dim", stream=sys.stderr), file=sys.stderr, flush=True)

    progress(f"Running {image}")
    try:
        output = await run_inference(
            image,
            args.input,
            output_path=args.output,
            docker_host=args.docker_host,
            progress=progress,
        )
    except InferenceError as exc:
        raise CLIError(str(exc)) from None
    print_output(output, args.output)
    return 0


async def infer_on_server(args: argparse.Namespace) -> int:
    from cog.cli.infer import InferenceError, parse_inputs, resolve_names

    async with client(args) as registry:
        package = await registry.show(args.id)
        signature = package.get("Signature") or {}
        arguments = signature.get("arguments") or {}
        try:
            inputs = resolve_names(parse_inputs(args.input), arguments)
            output = await registry.predict(package["ID"], inputs, args.output, signature)
        except InferenceError as exc:
            raise CLIError(str(exc)) from None
    print_output(output, args.output)
    return 0


def print_output(output, path: Path | None) -> None:
    """The output: its text (written to ``path`` if given), and where its files went."""
    written = [where for where in (output.path, *output.paths) if where is not None]
    if output.text is not None:
        if path and not written:
            path.write_text(output.text)
            print(f"Written to {shown_path(path)}")
            return
        print(output.text.rstrip("\n"))
    # Where the files went: the output itself on stdout when it is only files; beside
    # text (a JSON object naming them), on stderr.
    stream = sys.stdout if output.text is None else sys.stderr
    for where in written:
        print(f"Written to {shown_path(where)}", file=stream)


#: How much of a package's error a one-line warning quotes.
_REASON = 300


def not_ready(package: dict[str, Any]) -> str:
    """Why a package is not ready, in one line: its error's lines joined."""
    short, status = package["ID"][:12], package.get("Status")
    lines = (package.get("Error") or "").splitlines()
    reason = "; ".join(line.strip().rstrip(":") for line in lines if line.strip())
    reason = plain(reason)
    if len(reason) > _REASON:
        reason = reason[: _REASON - 3] + "..."
    if status == "failed":
        return f"package {short} failed" + (f": {reason}" if reason else "")
    return f"package {short} is {status}" + (f" ({reason})" if reason else "")


def shown_path(path: Path) -> str:
    """A path as the user would write it: relative to the current directory if inside."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
