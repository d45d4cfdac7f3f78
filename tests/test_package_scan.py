"""Checking members as an upload streams in (MemberScan), and what PackageArchive makes of
it: a member the scan checked is not read again, and nothing else changes. Every hostile
zip of test_package_archive is refused the same when it was scanned on the way in."""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
from pathlib import Path

import pytest

from cog.package import InvalidPackage, PackageArchive, PackageLimits, write_package, writer
from cog.package.scan import MemberScan
from tests.test_package_archive import BAD, COG_YAML, MODEL, our_package, zip_bytes

MiB = 1024 * 1024


def scan_of(data: bytes, *, pieces: int | None = None, seed: int = 0, max_members: int = 10_000):
    """A scan fed ``data`` as a stream: in random cuts (or ``pieces`` even ones)."""
    scan = MemberScan(max_members)
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        step = -(-len(data) // pieces) if pieces else rng.randint(1, 100_000)
        scan.feed(data[at : at + step])
        at += step
    return scan


def member_offsets(data: bytes) -> dict[str, int]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: i.header_offset for i in zf.infolist()}


def outcome(path: Path, **kwargs) -> str:
    """ "opened", or the refusal's message."""
    try:
        with PackageArchive.open(path, **kwargs):
            return "opened"
    except InvalidPackage as exc:
        return str(exc)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The members PackageArchive reads (each open_member call)."""
    seen: list[str] = []
    original = PackageArchive.open_member

    def counted(self, name):
        seen.append(name)
        return original(self, name)

    monkeypatch.setattr(PackageArchive, "open_member", counted)
    return seen


@pytest.mark.parametrize("pieces", [1, 7, None], ids=["whole", "seven pieces", "random cuts"])
def test_every_member_of_our_package_is_checked_as_it_streams(tmp_path, pieces):
    data = our_package(tmp_path)
    scan = scan_of(data, pieces=pieces)
    offsets = member_offsets(data)
    assert sorted(scan.members) == sorted(offsets.values())
    assert {m.name.decode() for m in scan.members.values()} == set(offsets)
    assert not scan.following  # it stopped at the central directory


def test_a_byte_at_a_time_finds_the_same(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "cog.yaml").write_text(COG_YAML)
    (root / "empty").write_bytes(b"")  # a member with no data at all
    (root / "naïve.txt").write_text("x" * 300)
    out = io.BytesIO()
    write_package(root, out)
    data = out.getvalue()
    one_by_one = MemberScan(100)
    for byte in data:
        one_by_one.feed(bytes([byte]))
    assert one_by_one.members == scan_of(data, pieces=1).members
    assert len(one_by_one.members) == 3


def test_zip64_local_headers_are_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_ZIP64_LIMIT", 1000)  # every member over it uses ZIP64
    data = our_package(tmp_path)
    assert len(scan_of(data).members) == len(member_offsets(data))


def test_a_member_whose_bytes_do_not_match_its_crc_is_not_recorded(tmp_path):
    data = bytearray(our_package(tmp_path))
    offsets = member_offsets(bytes(data))
    weights = offsets["weights/model.bin"]
    data[weights + 30 + len("weights/model.bin") + 1000] ^= 0xFF
    scan = scan_of(bytes(data))
    assert weights not in scan.members
    assert set(scan.members) == set(offsets.values()) - {weights}  # the others still are


class Unseekable(io.RawIOBase):
    """A pipe-like sink: zipfile then puts sizes and CRCs in data descriptors."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += b
        return len(b)


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED], ids=["deflated", "stored"]
)
def test_what_it_cannot_check_exactly_it_leaves_alone(compression):
    """Deflated members, and stored ones whose sizes and CRC follow the data (a data
    descriptor: zipfile writing to a pipe), are not followed: the full check reads them."""
    out = Unseekable()
    with zipfile.ZipFile(out, "w", compression) as zf:
        zf.writestr("cog.yaml", COG_YAML)
        zf.writestr("infer.py", MODEL)
    data = bytes(out.data)
    assert struct.unpack_from("<H", data, 6)[0] & 0x08  # the descriptor flag
    scan = scan_of(data)
    assert scan.members == {} and not scan.following


def test_headers_without_names_cannot_stall_it():
    """Headers of 30 bytes with an empty name and no data, over and over: each is taken
    in turn (no loop that takes nothing), and the scan stops at its member limit."""
    header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    scan = MemberScan(max_members=50)
    scan.feed(header * 1000)
    assert len(scan.members) == 50 and not scan.following


def test_our_package_is_not_read_again_when_it_was_scanned(tmp_path, reads):
    data = our_package(tmp_path)
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    with PackageArchive.open(path, scanned=scan_of(data).members) as archive:
        assert len(archive.names) == 4
    assert reads == []
    with PackageArchive.open(path):  # without a scan: every member read once
        pass
    assert sorted(reads) == sorted(member_offsets(data))


def test_a_scan_of_other_bytes_is_not_taken(tmp_path, reads):
    """A scan speaks of the bytes it was fed: for another zip (other offsets, CRCs,
    sizes), every member is read."""
    scanned = scan_of(our_package(tmp_path)).members
    other = tmp_path / "other.zip"
    other.write_bytes(zip_bytes([("cog.yaml", COG_YAML), ("infer.py", MODEL)]))
    PackageArchive.open(other, scanned=scanned).close()
    assert sorted(reads) == ["cog.yaml", "infer.py"]
    stored = tmp_path / "stored.zip"
    stored.write_bytes(zip_bytes([("cog.yaml", "model: infer.py:Other\n")], zipfile.ZIP_STORED))
    reads.clear()
    PackageArchive.open(stored, scanned=scanned).close()  # same offset, other CRC and size
    assert reads == ["cog.yaml"]


def test_a_member_overlapped_by_another_entry_is_read_again(tmp_path, reads):
    """A stored member whose data holds a second, hidden member the directory points at:
    the outer one is overlapped (zipfile refuses such zips where it checks), so the scan's
    word for it is not taken."""
    hidden = io.BytesIO()
    with zipfile.ZipFile(hidden, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("infer.py", MODEL)
    inner = hidden.getvalue()
    inner_header = inner[: inner.index(b"PK\x01\x02")]  # infer.py's header and data
    data = zip_bytes([("cog.yaml", COG_YAML), ("blob.bin", inner_header)], zipfile.ZIP_STORED)
    offsets = member_offsets(data)
    hidden_at = data.index(inner_header, offsets["blob.bin"] + 30)
    # Add infer.py to the central directory, pointing inside blob.bin's data.
    with zipfile.ZipFile(io.BytesIO(inner)) as zf:
        info = zf.getinfo("infer.py")
    central_at = data.index(b"PK\x01\x02")
    end_at = data.rindex(b"PK\x05\x06")
    central = data[central_at:end_at]
    entry = inner[inner.index(b"PK\x01\x02") : inner.rindex(b"PK\x05\x06")]
    entry = entry[:42] + struct.pack("<I", hidden_at) + entry[46:]
    assert struct.unpack_from("<I", entry, 16)[0] == info.CRC
    end = bytearray(data[end_at:])
    struct.pack_into("<HHI", end, 8, 3, 3, len(central) + len(entry))
    crafted = data[:central_at] + central + entry + bytes(end)
    path = tmp_path / "upload.zip"
    path.write_bytes(crafted)
    scan = scan_of(crafted)
    assert offsets["blob.bin"] in scan.members and hidden_at not in scan.members
    expected = outcome(path)  # whatever zipfile makes of it here, with no scan
    reads.clear()
    assert outcome(path, scanned=scan.members) == expected
    assert "blob.bin" in reads and "infer.py" in reads


@pytest.mark.parametrize("case", list(BAD))
def test_every_hostile_zip_is_refused_the_same_when_it_was_scanned(tmp_path, case):
    make, _ = BAD[case]
    data = make(tmp_path)
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    expected = outcome(path)
    assert expected != "opened"
    assert outcome(path, scanned=scan_of(data).members) == expected


def test_every_corruption_and_truncation_has_the_same_outcome_scanned_or_not(tmp_path):
    """Our own package (the one the scan follows), each byte flipped in turn and cut at
    every length: opened or refused, with the same message, whether it was scanned as it
    arrived or not."""
    root = tmp_path / "small"
    root.mkdir()
    (root / "cog.yaml").write_text(COG_YAML)
    (root / "infer.py").write_text(MODEL)
    (root / "naïve.txt").write_text("a UTF-8 name\n")
    out = io.BytesIO()
    write_package(root, out)
    data = out.getvalue()
    rng = random.Random(2026)
    path = tmp_path / "upload.zip"
    limits = PackageLimits()
    candidates = [data[:length] for length in range(len(data))]
    for at in range(len(data)):
        corrupt = bytearray(data)
        corrupt[at] ^= rng.randrange(1, 256)
        candidates.append(bytes(corrupt))
    opened = 0
    for candidate in candidates:
        path.write_bytes(candidate)
        expected = outcome(path, limits=limits)
        scanned = scan_of(candidate, seed=len(candidate)).members
        assert outcome(path, limits=limits, scanned=scanned) == expected
        opened += expected == "opened"
    assert 0 < opened < len(candidates)


def test_a_large_member_scans_in_bounded_memory():
    import tracemalloc

    scan = MemberScan(10)
    header = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0x0800, 0, 0, 0, 0, 64 * MiB, 64 * MiB, 1, 0
    )
    block = os.urandom(MiB)
    tracemalloc.start()
    try:
        scan.feed(header + b"w")
        for _ in range(64):
            scan.feed(block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB // 4, peak
