"""Which files of a model directory go in its package.

Every regular file under the root, except anything in a ``.git`` directory, bytecode
(``__pycache__/``, ``*.pyc``: it embeds source mtimes; a ``!`` rule brings it back), what
``.cogignore`` lists in gitignore syntax (an excluded directory is not entered, as in
git) and the zip being written. A symbolic link to a file inside the tree is that file's
content under the link's name; any other link, and special files, are refused unless
``.cogignore`` excludes them. Empty directories are not kept.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs

from cog.package.zipformat import member_name_problem

IGNORE_FILE = ".cogignore"
#: excluded unless .cogignore re-includes them
DEFAULT_IGNORES = ("__pycache__/", "*.pyc")


class PackageError(Exception):
    """A directory cannot be packaged; the message says which file and why."""


class PackageIgnore:
    """The rules saying which paths stay out of a package.

    ``.git`` (at any depth) is always excluded; then DEFAULT_IGNORES and the given
    gitignore-syntax lines, later lines overriding earlier ones (``!pattern`` re-includes).
    Paths are relative, '/'-separated; directories are asked about with ``is_dir=True``.
    """

    def __init__(self, lines: Iterable[str] = ()):
        import pathspec  # server/CLI dependency; the in-image runtime never imports this

        self._spec = pathspec.GitIgnoreSpec.from_lines([*DEFAULT_IGNORES, *lines])

    @classmethod
    def from_root(cls, root: Path) -> PackageIgnore:
        """The rules for a package directory: its ``.cogignore``, if it has one."""
        path = root / IGNORE_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise PackageError(f"cannot read {IGNORE_FILE}: {error_reason(exc)}") from None
        return cls(text.splitlines())

    def ignores(self, path: str, is_dir: bool = False) -> bool:
        if ".git" in path.split("/"):
            return True
        return self._spec.match_file(path + "/" if is_dir else path)


@attrs.frozen
class SourceFile:
    """One file to package."""

    #: member name: the relative posix path under the root
    name: str
    #: the file to read (a link's target, for links)
    path: str


def package_files(root: Path) -> list[str]:
    """The sorted relative paths that :func:`write_package` would put in the package."""
    root = check_root(root)
    return [f.name for f in source_files(root, PackageIgnore.from_root(root), set())]


def check_root(root: Path) -> Path:
    """``root`` as a Path, once it is known to be a directory (else PackageError)."""
    root = Path(root)
    if not root.exists():
        raise PackageError(f"{root} does not exist")
    if not root.is_dir():
        raise PackageError(f"{root} is not a directory")
    return root


def source_files(root: Path, ignore: PackageIgnore, skip: set[tuple[int, int]]) -> list[SourceFile]:
    """Every file to package, sorted by name; PackageError on anything we cannot package.

    ``skip`` holds (st_dev, st_ino) of files never to include (the zip being written).
    """
    real_root = os.path.realpath(root)
    files: list[SourceFile] = []

    def visit(directory: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise PackageError(
                f"cannot read directory {prefix or '.'}: {error_reason(exc)}"
            ) from None
        for entry in entries:
            name = prefix + entry.name
            try:
                add(entry, name)
            except OSError as exc:  # e.g. removed while we walk
                raise PackageError(f"cannot read {name}: {error_reason(exc)}") from None

    def add(entry: os.DirEntry, name: str) -> None:
        if entry.is_dir(follow_symlinks=False):
            if not ignore.ignores(name, is_dir=True):
                visit(entry.path, name + "/")
        elif entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            if not ignore.ignores(name) and (st.st_dev, st.st_ino) not in skip:
                _check_name(name)
                files.append(SourceFile(name, entry.path))
        elif entry.is_symlink():
            source = _follow_link(real_root, entry, name, ignore, skip)
            if source is not None:
                files.append(source)
        elif not ignore.ignores(name):
            raise PackageError(
                f"{name} is not a regular file (a socket, fifo or device): list it in {IGNORE_FILE}"
            )

    visit(real_root, "")
    files.sort(key=lambda f: f.name)
    return files


def _follow_link(
    real_root: str,
    entry: os.DirEntry,
    name: str,
    ignore: PackageIgnore,
    skip: set[tuple[int, int]],
) -> SourceFile | None:
    """A link to a regular file inside the tree, as that file; None if excluded."""
    target = os.readlink(entry.path)
    try:
        st = os.stat(entry.path)
    except OSError:
        if ignore.ignores(name):
            return None
        raise PackageError(
            f"{name} is a symbolic link to {target}, which does not exist: "
            f"remove it or list it in {IGNORE_FILE}"
        ) from None
    if ignore.ignores(name, is_dir=stat.S_ISDIR(st.st_mode)):
        return None
    if (st.st_dev, st.st_ino) in skip:
        return None
    real = os.path.realpath(entry.path)
    inside = os.path.relpath(real, real_root)
    if inside == ".." or inside.startswith(".." + os.sep) or os.path.isabs(inside):
        raise PackageError(
            f"{name} is a symbolic link to {target}, outside the package directory: "
            f"copy the file in, or list the link in {IGNORE_FILE}"
        )
    if ".git" in inside.split(os.sep):
        raise PackageError(f"{name} is a symbolic link into .git: list it in {IGNORE_FILE}")
    if stat.S_ISDIR(st.st_mode):
        raise PackageError(
            f"{name} is a symbolic link to a directory ({target}); packages hold only files: "
            f"replace it with a copy, or list it in {IGNORE_FILE}"
        )
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(
            f"{name} is a symbolic link to {target}, which is not a regular file: "
            f"list it in {IGNORE_FILE}"
        )
    _check_name(name)
    return SourceFile(name, entry.path)


def _check_name(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackageError(f"{name!r}: the file name is not valid UTF-8; rename it") from None
    problem = member_name_problem(name)
    if problem is not None:
        raise PackageError(f"{name!r}: the file name {problem}; rename it")


def error_reason(exc: BaseException) -> str:
    """An OSError's reason without the errno and path clutter, for PackageError messages."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
