"""Server side of packages: opening an uploaded zip, and refusing every hostile one.

The malicious zips are built here with zipfile and, where zipfile will not write them, by
patching its bytes: a bad upload is just bytes, and these are the bytes an attacker sends.
"""

from __future__ import annotations

import io
import os
import random
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

from cog.package import (
    InvalidPackage,
    MemberInfo,
    PackageArchive,
    PackageLimits,
    write_package,
)

COG_YAML = "model: infer.py:Model\n"
MODEL = "import cog\n\n\nclass Model(cog.Model):\n    def run(self):\n        return 1\n"
MiB = 1024 * 1024


def zip_bytes(members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``members``: name -> data, or a ZipInfo -> data for full control."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w", compression) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return out.getvalue()


def valid_members(*extra):
    return [("cog.yaml", COG_YAML), ("infer.py", MODEL), *extra]


def entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with every ``old`` replaced by ``new`` (same length: offsets stay valid)."""
    assert len(old) == len(new) and old in data
    return data.replace(old, new)


def headers(data: bytes, signature: bytes) -> list[int]:
    found, at = [], data.find(signature)
    while at >= 0:
        found.append(at)
        at = data.find(signature, at + 1)
    return found


def set_u16(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<H", value) + data[offset + 2 :]


def set_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<I", value) + data[offset + 4 :]


def lying_sizes(data: bytes, name: bytes, size: int) -> bytes:
    """Declare ``size`` as the uncompressed size of member ``name``, in both headers."""
    for at in headers(data, b"PK\x03\x04"):
        if data[at + 30 : at + 30 + len(name)] == name:
            data = set_u32(data, at + 22, size)
    for at in headers(data, b"PK\x01\x02"):
        if data[at + 46 : at + 46 + len(name)] == name:
            data = set_u32(data, at + 24, size)
    return data


def encrypted(data: bytes) -> bytes:
    for at in headers(data, b"PK\x03\x04"):
        data = set_u16(data, at + 6, struct.unpack_from("<H", data, at + 6)[0] | 1)
    for at in headers(data, b"PK\x01\x02"):
        data = set_u16(data, at + 8, struct.unpack_from("<H", data, at + 8)[0] | 1)
    return data


def lying_count(data: bytes, count: int) -> bytes:
    at = data.rfind(b"PK\x05\x06")
    return set_u16(set_u16(data, at + 8, count), at + 10, count)


def padded(name: str, extra_bytes: int) -> zipfile.ZipInfo:
    """A member whose extra field (an unknown, well-formed record) is ``extra_bytes`` long."""
    info = zipfile.ZipInfo(name)
    info.extra = struct.pack("<HH", 0xCAFE, extra_bytes - 4) + bytes(extra_bytes - 4)
    return info


def zeros_zip(size: int, *extra) -> bytes:
    """A deflated zip holding ``size`` zero bytes, written in chunks."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in valid_members(*extra):
            zf.writestr(name, data)
        with zf.open("zeros.bin", "w") as f:
            block = bytes(MiB)
            for _ in range(size // MiB):
                f.write(block)
    return out.getvalue()


def our_package(tmp_path: Path) -> bytes:
    root = tmp_path / "src"
    (root / "weights").mkdir(parents=True)
    (root / "cog.yaml").write_text(COG_YAML)
    (root / "infer.py").write_text(MODEL)
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "weights" / "model.bin").write_bytes(os.urandom(3 * MiB))
    out = io.BytesIO()
    write_package(root, out)
    return out.getvalue()


def open_bytes(tmp_path: Path, data: bytes, limits: PackageLimits | None = None, **kwargs):
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    return PackageArchive.open(path, limits, **kwargs)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- accepted ---------------------------------------------------------------------------


def test_a_package_written_by_the_client_opens(tmp_path):
    data = our_package(tmp_path)
    with open_bytes(tmp_path, data) as archive:
        assert archive.names == ["cog.yaml", "infer.py", "run.sh", "weights/model.bin"]
        assert archive.read_text("cog.yaml") == COG_YAML
        assert archive.exists("weights/model.bin")
        assert list(archive.iter_members()) == [
            MemberInfo("cog.yaml", len(COG_YAML), 0o644),
            MemberInfo("infer.py", len(MODEL), 0o644),
            MemberInfo("run.sh", 10, 0o755),
            MemberInfo("weights/model.bin", 3 * MiB, 0o644),
        ]
        assert archive.uncompressed_size == len(COG_YAML) + len(MODEL) + 10 + 3 * MiB
        with archive.open_member("weights/model.bin") as f:
            first = f.read(1000)
            rest = f.read()
        expected = (tmp_path / "src" / "weights" / "model.bin").read_bytes()
        assert first + rest == expected


def test_zips_from_other_tools_open_too(tmp_path):
    # Deflated members and directory entries, as `zip -r` or shutil.make_archive write.
    data = zip_bytes(
        [
            (entry("data/", stat.S_IFDIR | 0o755), b""),
            ("cog.yaml", COG_YAML),
            ("infer.py", MODEL),
            ("data/labels.txt", "cat\ndog\n"),
            (entry("tool", stat.S_IFREG | 0o750), b"#!/bin/sh\n"),
        ]
    )
    with open_bytes(tmp_path, data) as archive:
        assert archive.names == ["cog.yaml", "infer.py", "data/labels.txt", "tool"]
        assert archive.read_text("data/labels.txt") == "cat\ndog\n"
        assert not archive.exists("data")  # directories are not files
        modes = {m.name: m.mode for m in archive.iter_members()}
        assert modes == {
            "cog.yaml": 0o644,
            "infer.py": 0o644,
            "data/labels.txt": 0o644,
            "tool": 0o755,
        }


def test_paths_asked_by_config_code_are_normalized_and_cannot_escape(tmp_path):
    with open_bytes(tmp_path, zip_bytes(valid_members(("src/model.py", MODEL)))) as archive:
        assert archive.exists("./infer.py")
        assert archive.exists("src//model.py")
        assert archive.exists("src/../infer.py")
        assert archive.read_text("./src/model.py") == MODEL
        for outside in ["../infer.py", "/infer.py", "src/../../infer.py", "", ".", "src"]:
            assert not archive.exists(outside), outside
        with pytest.raises(FileNotFoundError, match=r"missing\.txt is not in the package"):
            archive.read_text("missing.txt")
        with pytest.raises(FileNotFoundError):
            archive.open_member("../../etc/passwd")


def test_read_text_strips_a_bom_and_refuses_binary_and_huge_files(tmp_path):
    members = valid_members(
        ("bom.txt", "\ufeffhello".encode()),
        ("binary.bin", b"\x89PNG\r\n\x1a\n\xff\xff"),
        ("big.txt", "x" * 2000),
    )
    with open_bytes(tmp_path, zip_bytes(members), PackageLimits(max_text_bytes=1000)) as archive:
        assert archive.read_text("bom.txt") == "hello"
        with pytest.raises(InvalidPackage, match=r"binary\.bin is not UTF-8 text"):
            archive.read_text("binary.bin")
        with pytest.raises(InvalidPackage, match=r"big\.txt is too large to read as text"):
            archive.read_text("big.txt")


def test_small_very_compressible_packages_are_fine(tmp_path):
    # 32 MiB of zeros deflate ~1000 times, but under the ratio threshold that is no bomb.
    with open_bytes(tmp_path, zeros_zip(32 * MiB)) as archive:
        assert archive.exists("zeros.bin")


def test_extract_to_writes_files_with_their_modes(tmp_path):
    data = our_package(tmp_path)
    dest = tmp_path / "out"
    with open_bytes(tmp_path, data) as archive:
        archive.extract_to(dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "cog.yaml",
        "infer.py",
        "run.sh",
        "weights/model.bin",
    ]
    assert (dest / "weights" / "model.bin").read_bytes() == (
        tmp_path / "src" / "weights" / "model.bin"
    ).read_bytes()
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "cog.yaml").stat().st_mode) == 0o644


def test_extract_to_wants_an_empty_directory(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "evil").symlink_to("/etc")  # a planted link must never be written through
    archive = open_bytes(tmp_path, zip_bytes(valid_members(("evil/passwd", "x"))))
    with archive, pytest.raises(ValueError, match="not empty"):
        archive.extract_to(dest)
    assert os.listdir(dest) == ["evil"]


def test_extract_to_removes_what_it_wrote_when_a_member_is_bad(tmp_path):
    data = lying_sizes(zip_bytes(valid_members(("z/zeros.bin", bytes(MiB)))), b"z/zeros.bin", 1000)
    dest = tmp_path / "out"
    with open_bytes(tmp_path, data, verify=False) as archive, pytest.raises(InvalidPackage):
        archive.extract_to(dest)
    assert not dest.exists()


# -- refused ----------------------------------------------------------------------------


def _truncated(fraction: float):
    def make(tmp_path):
        data = our_package(tmp_path)
        return data[: int(len(data) * fraction)]

    return make


def _constant(data: bytes):
    return lambda tmp_path: data


BAD = {
    "empty file": (_constant(b""), "empty"),
    "text, not a zip": (_constant(b"this is not a zip file at all\n" * 10), "not a zip"),
    "random bytes": (_constant(random.Random(7).randbytes(100_000)), "not a zip"),
    "truncated at 10%": (_truncated(0.1), "truncated"),
    "truncated at 50%": (_truncated(0.5), "truncated"),
    "truncated in the central directory": (_truncated(0.9999), "truncated"),
    "no cog.yaml": (_constant(zip_bytes([("infer.py", MODEL)])), "no cog.yaml at the root"),
    "cog.yaml in a subdirectory": (
        _constant(zip_bytes([("model/cog.yaml", COG_YAML), ("model/infer.py", MODEL)])),
        "found model/cog.yaml",
    ),
    "cog.yaml is a directory": (
        _constant(zip_bytes([("cog.yaml/", b""), ("infer.py", MODEL)])),
        "no cog.yaml",
    ),
    "absolute path": (_constant(zip_bytes(valid_members(("/etc/evil", "x")))), "absolute"),
    "dot-dot": (_constant(zip_bytes(valid_members(("../evil", "x")))), "outside"),
    "dot-dot inside": (_constant(zip_bytes(valid_members(("a/../../evil", "x")))), "outside"),
    "dot-dot directory": (_constant(zip_bytes(valid_members(("../", b"")))), "outside"),
    "backslash": (_constant(zip_bytes(valid_members(("..\\evil", "x")))), "backslash"),
    "drive letter": (_constant(zip_bytes(valid_members(("C:/evil", "x")))), "drive letter"),
    "dot part": (_constant(zip_bytes(valid_members(("./infer.py", "x")))), "normalized"),
    "empty part": (_constant(zip_bytes(valid_members(("a//b", "x")))), "normalized"),
    "control character": (_constant(zip_bytes(valid_members(("a\nb", "x")))), "control"),
    "NUL in a name": (
        _constant(patched(zip_bytes(valid_members(("evil.txt#.py", "x"))), b"#", b"\0")),
        "NUL",
    ),
    "symlink member": (
        _constant(zip_bytes(valid_members((entry("link", stat.S_IFLNK | 0o777), "/etc/passwd")))),
        "symbolic link",
    ),
    "symlink directory member": (
        _constant(zip_bytes(valid_members((entry("dir/", stat.S_IFLNK | 0o777), b"")))),
        "symbolic link",
    ),
    "character device": (
        _constant(zip_bytes(valid_members((entry("tty", stat.S_IFCHR | 0o666), b"")))),
        "special file",
    ),
    "fifo": (
        _constant(zip_bytes(valid_members((entry("pipe", stat.S_IFIFO | 0o666), b"")))),
        "special file",
    ),
    "duplicate names": (
        _constant(zip_bytes(valid_members(("infer.py", "print('the other one')")))),
        "infer.py appears twice",
    ),
    "duplicate directories": (
        _constant(zip_bytes(valid_members(("d/", b""), ("d/", b"")))),
        "twice",
    ),
    "a file and a directory of the same name": (
        _constant(zip_bytes(valid_members(("weights", "x"), ("weights/a.bin", "y")))),
        "weights is both a file and a directory",
    ),
    "a directory entry with data": (
        _constant(zip_bytes(valid_members((entry("d", stat.S_IFDIR | 0o755), b"data")))),
        "directory entry with data",
    ),
    "encrypted": (_constant(encrypted(zip_bytes(valid_members()))), "encrypted"),
    "bzip2": (
        _constant(zip_bytes(valid_members(), compression=zipfile.ZIP_BZIP2)),
        "unsupported compression",
    ),
    "too many members": (
        _constant(zip_bytes(valid_members(*((f"f/{i}", b"") for i in range(10_000))))),
        "over the limit of 10,000",
    ),
    "too many members behind a lying count": (
        _constant(
            lying_count(zip_bytes(valid_members(*((f"{i}", b"") for i in range(10_000)))), 2)
        ),
        "more than 10,000",
    ),
    "a central directory of huge extra fields": (
        _constant(zip_bytes(valid_members(*((padded(f"{i}", 60_000), b"") for i in range(200))))),
        "central directory is 11.5 MiB, over the limit of 9.8 MiB",
    ),
    "zip bomb: ratio": (_constant(zeros_zip(100 * MiB)), "ratio"),
    "zip bomb: declared size over the limit": (
        _constant(
            lying_sizes(
                zip_bytes(valid_members(("zeros.bin", b"\0" * 1000))), b"zeros.bin", 2**32 - 1
            )
        ),
        "uncompressed",
    ),
    "zip bomb: header understates the size": (
        _constant(
            lying_sizes(zip_bytes(valid_members(("zeros.bin", bytes(8 * MiB)))), b"zeros.bin", 1000)
        ),
        "zeros.bin is corrupt",
    ),
    "header overstates the size": (
        _constant(
            lying_sizes(zip_bytes(valid_members(("zeros.bin", bytes(1000)))), b"zeros.bin", 5000)
        ),
        "zeros.bin is corrupt",
    ),
    "a flipped bit in a member": (
        _constant(
            patched(zip_bytes(valid_members(("note.txt", "hello world")), 0), b"hello", b"jello")
        ),
        "note.txt is corrupt",
    ),
    "local and central names differ": (
        _constant(
            (lambda d: d[:30] + b"cog.yamx" + d[38:])(
                zip_bytes(valid_members(), zipfile.ZIP_STORED)
            )
        ),
        "corrupt",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_are_refused_with_a_readable_message(tmp_path, case):
    make, words = BAD[case]
    data = make(tmp_path)
    fds = open_fds()
    with pytest.raises(InvalidPackage) as caught:
        open_bytes(tmp_path, data)
    message = str(caught.value)
    assert words.lower() in message.lower(), message
    assert "\n" not in message and "Traceback" not in message
    assert open_fds() == fds  # the zip was closed again


def test_limits_are_configurable(tmp_path):
    data = zip_bytes(valid_members(("a.txt", "a"), ("b.txt", "b")))
    with pytest.raises(InvalidPackage, match="4 files and directories, over the limit of 3"):
        open_bytes(tmp_path, data, PackageLimits(max_members=3))
    open_bytes(tmp_path, data, PackageLimits(max_members=4)).close()

    data = zip_bytes(valid_members(("zeros.bin", bytes(MiB))))
    with pytest.raises(InvalidPackage, match=r"over the limit of 1\.0 MiB"):
        open_bytes(tmp_path, data, PackageLimits(max_uncompressed_bytes=MiB))
    with pytest.raises(InvalidPackage, match="ratio limit of 10"):
        open_bytes(tmp_path, data, PackageLimits(max_ratio=10, ratio_threshold_bytes=0))
    open_bytes(tmp_path, data, PackageLimits(max_ratio=10)).close()  # under the threshold


def test_a_lying_member_is_caught_while_reading_when_not_verified_up_front(tmp_path):
    data = lying_sizes(zip_bytes(valid_members(("zeros.bin", bytes(8 * MiB)))), b"zeros.bin", 1000)
    with open_bytes(tmp_path, data, verify=False) as archive:
        assert archive.uncompressed_size < 2000
        reader = archive.open_member("zeros.bin")
        with reader, pytest.raises(InvalidPackage, match=r"zeros\.bin is corrupt"):
            while reader.read(64 * 1024):
                pass


def test_no_member_yields_more_than_its_declared_size(tmp_path):
    data = lying_sizes(zip_bytes(valid_members(("zeros.bin", bytes(8 * MiB)))), b"zeros.bin", 1000)
    with open_bytes(tmp_path, data, verify=False) as archive:
        f = archive.open_member("zeros.bin")
        got = 0
        with pytest.raises(InvalidPackage):
            while chunk := f.read(100):
                got += len(chunk)
        f.close()
    assert got <= 1000


def small_package(tmp_path: Path) -> bytes:
    root = tmp_path / "small"
    root.mkdir()
    (root / "cog.yaml").write_text(COG_YAML)
    (root / "naïve.txt").write_text("a UTF-8 name\n")  # sets the UTF-8 flag
    out = io.BytesIO()
    write_package(root, out)
    return out.getvalue()


@pytest.mark.parametrize("sample", ["deflated, with directories", "ours"])
def test_every_corruption_and_truncation_of_a_package_is_refused_or_harmless(tmp_path, sample):
    # Whatever a broken upload looks like, the answer is a package or InvalidPackage:
    # never another exception (which the server would turn into a 500).
    if sample == "ours":
        data = small_package(tmp_path)
    else:
        data = zip_bytes(valid_members(("data/", b""), ("data/labels.txt", "cat\ndog\n")))
    rng = random.Random(2021)
    path = tmp_path / "upload.zip"
    outcomes = {"opened": 0, "refused": 0}

    def attempt(candidate: bytes) -> None:
        path.write_bytes(candidate)
        try:
            with PackageArchive.open(path) as archive:
                for name in archive.names:
                    with archive.open_member(name) as f:
                        f.read()
            outcomes["opened"] += 1
        except InvalidPackage as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1

    for at in range(len(data)):
        corrupt = bytearray(data)
        corrupt[at] ^= rng.randrange(1, 256)
        attempt(bytes(corrupt))
    for length in range(len(data)):
        attempt(data[:length])
    assert outcomes["refused"] > len(data)  # every truncation, and most corruptions
    assert outcomes["opened"] > 0  # a flipped byte in, say, a timestamp is harmless
