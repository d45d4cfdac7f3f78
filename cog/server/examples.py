"""The files a package's examples name (``@input.png``), served so the page can show them.

Only files that an example names are served, and only up to a size: the page shows an
example's picture, it is no file browser of packages. The first request for a package's
files copies its zip from storage to local disk (streamed), takes out the named files and
removes the zip; the files stay in a small on-disk cache (packages are content-addressed,
so a cached file never changes), of the most recently shown packages only.
"""

from __future__ import annotations

import asyncio
import collections
import mimetypes
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import attrs

from cog.package import PackageArchive, short_id
from cog.server.catalog import package_key
from cog.server.records import PackageRecord
from cog.storage import NotFound, Storage
from cog.streams import to_file
from cog.units import MiB, format_size

#: types a browser may show as they are; anything else is sent as a download
SHOWN_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "text/plain")


class ExampleFileNotFound(LookupError):
    """Not a file an example names, gone from the package, or too large to show (404)."""


@attrs.frozen
class ExampleFile:
    path: Path
    content_type: str
    #: the file's own name, for a download
    filename: str


def named_files(record: PackageRecord) -> list[str]:
    """The package files its examples name, in order, each once."""
    names: dict[str, None] = {}
    for example in record.config.examples:
        for value in [*example.input.values(), example.output or ""]:
            if value.startswith("@"):
                names[str(PurePosixPath(value[1:]))] = None
    return list(names)


def content_type(name: str) -> str:
    guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return guessed if guessed in SHOWN_TYPES else "application/octet-stream"


class ExampleFiles:
    """The on-disk cache of example files; one per server."""

    def __init__(
        self,
        storage: Storage,
        tmp_dir: Path,
        *,
        max_file_bytes: int = 16 * MiB,
        max_packages: int = 32,
    ):
        self.storage = storage
        self.tmp_dir = tmp_dir
        #: made on the first request: a server whose page shows no example has none
        self._cache_dir: Path | None = None
        self.max_file_bytes = max_file_bytes
        self.max_packages = max_packages
        #: package ID -> its taken-out files (name -> path), most recently used last
        self._cached: collections.OrderedDict[str, dict[str, Path]] = collections.OrderedDict()
        self._taking: dict[str, asyncio.Future[dict[str, Path]]] = {}

    def close(self) -> None:
        """Remove the cache (when the server stops)."""
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="examples-", dir=self.tmp_dir))
        return self._cache_dir

    async def get(self, record: PackageRecord, name: str) -> ExampleFile:
        name = str(PurePosixPath(name))
        if name not in named_files(record):
            raise ExampleFileNotFound(
                f"{name} is not a file named by an example of package {short_id(record.id)}"
            )
        files = await self._files(record)
        if name not in files:
            raise ExampleFileNotFound(
                f"{name} of package {short_id(record.id)} is missing or larger than "
                f"{format_size(self.max_file_bytes)}, the most shown"
            )
        filename = re.sub(r"[^\w.-]", "_", PurePosixPath(name).name)  # safe in a header
        return ExampleFile(files[name], content_type(name), filename)

    async def _files(self, record: PackageRecord) -> dict[str, Path]:
        if record.id in self._cached:
            self._cached.move_to_end(record.id)
            return self._cached[record.id]
        # One extraction per package, whoever asks meanwhile waits for it; shielded, so
        # one asker leaving does not fail the others.
        taking = self._taking.get(record.id)
        if taking is None:
            taking = asyncio.ensure_future(self._take_out(record))
            self._taking[record.id] = taking
            taking.add_done_callback(lambda _: self._taking.pop(record.id, None))
        return await asyncio.shield(taking)

    async def _take_out(self, record: PackageRecord) -> dict[str, Path]:
        folder = self.cache_dir / record.id
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="example-", suffix=".zip", dir=self.cache_dir)
        zip_path = Path(name)
        try:
            os.close(fd)
            try:
                async with self.storage.open_reader(package_key(record.id)) as blob:
                    await to_file(blob.chunks(), zip_path)
            except NotFound:
                raise ExampleFileNotFound(
                    f"package {short_id(record.id)} has no zip in storage"
                ) from None
            files = await asyncio.to_thread(self._extract, zip_path, named_files(record), folder)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        finally:
            await asyncio.to_thread(zip_path.unlink, missing_ok=True)
        self._cached[record.id] = files
        while len(self._cached) > self.max_packages:
            evicted, _ = self._cached.popitem(last=False)
            await asyncio.to_thread(shutil.rmtree, self.cache_dir / evicted, True)
        return files

    def _extract(self, zip_path: Path, names: list[str], folder: Path) -> dict[str, Path]:
        files = {}
        with PackageArchive.open(zip_path, verify=False) as archive:
            for number, name in enumerate(names):
                if not archive.exists(name):
                    continue
                target = folder / str(number)  # named by number: no path from the package
                with archive.open_member(name) as source, open(target, "wb") as out:
                    copied = 0
                    while chunk := source.read(1024 * 1024):
                        copied += len(chunk)
                        if copied > self.max_file_bytes:
                            break
                        out.write(chunk)
                if copied > self.max_file_bytes:
                    target.unlink()
                    continue
                files[name] = target
        return files
