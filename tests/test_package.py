"""Client side of packages: what goes in, and byte-for-byte determinism."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from cog.package import (
    PackageArchive,
    PackageError,
    PackageIgnore,
    PackageLimits,
    is_package_id,
    package_chunks,
    package_files,
    plan_package,
    write_package,
    writer,
)

ROOT = Path(__file__).resolve().parent.parent


def make_tree(root: Path) -> Path:
    """A small model directory with the kinds of files packages hold."""
    (root / "weights").mkdir(parents=True)
    (root / "cog.yaml").write_text("model: infer.py:Model\n")
    (root / "infer.py").write_text("import cog\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "empty.txt").write_bytes(b"")
    (root / "weights" / "model.bin").write_bytes(bytes(range(256)) * 64)
    (root / "weights" / "naïve ☃.txt").write_text("unicode names\n")
    (root / "weights.txt").write_text("sorts before weights/ by full path ('.' < '/')\n")
    return root


def package_of(root: Path) -> tuple[bytes, str]:
    out = io.BytesIO()
    package_id = write_package(root, out)
    return out.getvalue(), package_id


def id_of(root: Path) -> str:
    return package_of(root)[1]


# -- the zip itself ---------------------------------------------------------------------


def test_the_id_is_the_sha256_of_the_bytes_written(tmp_path):
    data, package_id = package_of(make_tree(tmp_path / "m"))
    assert package_id == hashlib.sha256(data).hexdigest()
    assert is_package_id(package_id)


def test_the_zip_is_plain_sorted_stored_and_carries_no_timestamps_or_owners(tmp_path):
    root = make_tree(tmp_path / "m")
    data, _ = package_of(root)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) == package_files(root)
        assert names == [
            "cog.yaml",
            "empty.txt",
            "infer.py",
            "run.sh",
            "weights.txt",
            "weights/model.bin",
            "weights/naïve ☃.txt",
        ]
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.extra == b""
            assert info.create_system == 3  # unix, so the modes below mean something
            assert zf.read(info) == (root / info.filename).read_bytes()
        modes = {i.filename: i.external_attr >> 16 for i in infos}
        assert modes["run.sh"] == 0o100755
        assert modes["infer.py"] == 0o100644


def test_standard_unzip_accepts_the_zip(tmp_path):
    unzip = shutil.which("unzip")
    if unzip is None:
        pytest.skip("no unzip on this machine")
    zip_path = tmp_path / "pkg.zip"
    with open(zip_path, "wb") as out:
        write_package(make_tree(tmp_path / "m"), out)
    result = subprocess.run([unzip, "-t", str(zip_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors detected" in result.stdout


def test_zip64_records_are_written_when_sizes_or_counts_need_them(tmp_path, monkeypatch):
    # The real thresholds (4 GiB, 65535 entries) are too big for a unit test; lowering
    # them exercises the same records, which zipfile and unzip must then read.
    monkeypatch.setattr(writer, "_ZIP64_LIMIT", 1000)
    monkeypatch.setattr(writer, "_ZIP64_COUNT_LIMIT", 3)
    root = make_tree(tmp_path / "m")
    (root / "weights" / "more.bin").write_bytes(os.urandom(5000))
    zip_path = tmp_path / "pkg.zip"
    with open(zip_path, "wb") as out:
        write_package(root, out)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        for info in zf.infolist():
            assert zf.read(info) == (root / info.filename).read_bytes()
        big = zf.getinfo("weights/model.bin")
        assert big.file_size == 256 * 64 and big.extract_version == 45
    # ...and zipfile got those sizes from the ZIP64 records, not from the plain fields.
    data = zip_path.read_bytes()
    central = data.index(b"PK\x01\x02" + bytes([45, 3]))
    assert data[central + 20 : central + 28] == b"\xff" * 8  # both sizes: see ZIP64 extra
    end = data.rindex(b"PK\x05\x06")
    assert data[end + 8 : end + 12] == b"\xff" * 4  # both counts: see ZIP64 end record
    with PackageArchive.open(zip_path) as archive:
        assert archive.names == package_files(root)
    if shutil.which("unzip"):
        result = subprocess.run(["unzip", "-t", str(zip_path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("zip64", [False, True], ids=["plain", "zip64"])
def test_the_plan_knows_the_zips_length_and_the_chunks_are_the_zip(tmp_path, monkeypatch, zip64):
    """What is streamed to the server is byte for byte what write_package writes (the ID
    is its hash), and its length is known before any file is read."""
    if zip64:  # sizes, offsets and counts past the (lowered) limits: every ZIP64 record
        monkeypatch.setattr(writer, "_ZIP64_LIMIT", 1000)
        monkeypatch.setattr(writer, "_ZIP64_COUNT_LIMIT", 3)
    root = make_tree(tmp_path / "m")
    (root / "weights" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    expected, package_id = package_of(root)
    plan = plan_package(root)
    assert plan.size == len(expected)
    assert [f.name for f in plan.files] == package_files(root)
    assert plan.content_size == sum((root / f.name).stat().st_size for f in plan.files)
    chunks = list(package_chunks(plan))
    assert all(isinstance(c, bytes) and len(c) <= 1024 * 1024 for c in chunks)
    assert b"".join(chunks) == expected
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == package_id


@pytest.mark.parametrize("change", ["grown", "shrunk"])
def test_a_file_resized_after_planning_is_an_error_before_its_bytes_are_sent(tmp_path, change):
    """The length was promised (Content-Length): a file whose size changed is refused
    when it is reached, before a byte of it goes out."""
    root = make_tree(tmp_path / "m")
    plan = plan_package(root)
    model = root / "weights" / "model.bin"
    model.write_bytes(model.read_bytes() + b"more" if change == "grown" else b"less")
    sent = b""
    with pytest.raises(PackageError, match=r"model\.bin changed while it was being packaged"):
        for chunk in package_chunks(plan):
            sent += chunk
    assert b"less" not in sent and len(sent) < plan.size


def test_the_format_has_not_changed(tmp_path):
    # IDs must stay stable from one cog release to the next (a rebuild of an unchanged
    # tree must find the stored package), so the ID of a fixed tree is pinned here.
    # If this fails, the package format changed: that is a breaking change.
    assert id_of(make_tree(tmp_path / "m")) == GOLDEN_ID


GOLDEN_ID = "57f22125403603abc525331fef82ad6b48d4f8994408c019cab7345d4a1b6ecb"


# -- determinism ------------------------------------------------------------------------


def test_the_same_tree_gives_the_same_bytes_after_copying_touching_and_chmod(tmp_path):
    original = make_tree(tmp_path / "a")
    first, first_id = package_of(original)

    copy = tmp_path / "b"
    shutil.copytree(original, copy)  # different inodes, directory order and ctime
    for path in copy.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
        if path.is_file():
            # group/other bits and the write bit do not matter; only the owner's x bit
            mode = 0o700 if os.access(path, os.X_OK) else 0o600
            os.chmod(path, mode)
    second, second_id = package_of(copy)
    assert second_id == first_id
    assert second == first


def test_the_same_tree_gives_the_same_id_under_another_umask_and_process(tmp_path):
    old = os.umask(0o077)
    try:
        strict = make_tree(tmp_path / "strict")
    finally:
        os.umask(old)
    old = os.umask(0o002)
    try:
        loose = make_tree(tmp_path / "loose")
    finally:
        os.umask(old)
    assert (strict / "infer.py").stat().st_mode != (loose / "infer.py").stat().st_mode
    here = id_of(strict)
    # Another interpreter with another hash seed and umask, on the other copy.
    code = (
        "import io, os, sys\n"
        "from pathlib import Path\n"
        "from cog.package import write_package\n"
        "os.umask(0o027)\n"
        "print(write_package(Path(sys.argv[1]), io.BytesIO()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(loose)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == here


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r: (r / "infer.py").write_text("import cog  \n"), id="content"),
        pytest.param(lambda r: os.chmod(r / "infer.py", 0o755), id="executable bit"),
        pytest.param(lambda r: (r / "infer.py").rename(r / "infer2.py"), id="rename"),
        pytest.param(lambda r: (r / "new.txt").write_bytes(b""), id="new empty file"),
        pytest.param(lambda r: (r / "empty.txt").unlink(), id="removed file"),
        pytest.param(
            lambda r: (r / "weights" / "model.bin").rename(r / "model.bin"), id="moved file"
        ),
    ],
)
def test_any_change_to_the_tree_changes_the_id(tmp_path, change):
    root = make_tree(tmp_path / "m")
    before = id_of(root)
    change(root)
    assert id_of(root) != before


# -- what goes in -----------------------------------------------------------------------


def test_git_directories_are_always_left_out(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "vendor" / "lib").mkdir(parents=True)
    (root / "vendor" / "lib" / ".git").write_text("gitdir: ../../.git/modules/lib\n")
    (root / "vendor" / "lib" / "code.py").write_text("x = 1\n")
    (root / ".cogignore").write_text("!.git\n!.git/\n")  # cannot be brought back
    files = package_files(root)
    assert "vendor/lib/code.py" in files
    assert not [f for f in files if ".git" in f.split("/")]
    assert ".cogignore" in files  # the rules themselves are part of the source


def test_cogignore_globs_directories_anchors_and_negation(tmp_path):
    root = make_tree(tmp_path / "m")
    for name in [
        "train.log",
        "keep.log",
        "logs/deep/run.log",
        "data/a.csv",
        "data/b/c.csv",
        "sub/data/x.csv",
        "top.txt",
        "sub/top.txt",
        "build/out.o",
        "build/keep.txt",
        "dist/pkg.whl",
        "dist/README",
        "notes/a.tmp",
        "notes/x/y/b.tmp",
        "notes/keep.md",
    ]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (root / ".cogignore").write_text(
        "# comments and blank lines are fine\n"
        "\n"
        "*.log\n"
        "!keep.log\n"
        "data/\n"  # a directory at any depth
        "/top.txt\n"  # anchored: only at the root
        "build/*\n"
        "!build/keep.txt\n"  # the directory itself is not excluded, so this works
        "dist/\n"
        "!dist/README\n"  # ...but here the directory is: git keeps it out too
        "notes/**/*.tmp\n"
    )
    files = set(package_files(root))
    assert {
        "keep.log",
        "sub/top.txt",
        "build/keep.txt",
        "notes/keep.md",
        "cog.yaml",
        ".cogignore",
    } <= files
    for gone in [
        "train.log",
        "logs/deep/run.log",
        "data/a.csv",
        "data/b/c.csv",
        "sub/data/x.csv",
        "top.txt",
        "build/out.o",
        "dist/pkg.whl",
        "dist/README",
        "notes/a.tmp",
        "notes/x/y/b.tmp",
    ]:
        assert gone not in files, gone
    # What package_files lists is exactly what is written.
    data, _ = package_of(root)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert set(zf.namelist()) == files


def test_bytecode_caches_are_left_out_unless_asked_for(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "infer.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (root / "stray.pyc").write_bytes(b"\x00")
    before = id_of(root)
    assert not [f for f in package_files(root) if "pyc" in f]
    (root / ".cogignore").write_text("!__pycache__/\n!*.pyc\n")
    assert {"__pycache__/infer.cpython-311.pyc", "stray.pyc"} <= set(package_files(root))
    (root / ".cogignore").unlink()
    assert id_of(root) == before


def test_ignore_rules_directly():
    rules = PackageIgnore(["*.bin", "!keep.bin", "cache/"])
    assert rules.ignores("a/model.bin")
    assert not rules.ignores("keep.bin")
    assert rules.ignores("cache", is_dir=True)
    assert not rules.ignores("cache")  # a file named cache: "cache/" means directories
    assert rules.ignores(".git", is_dir=True)
    assert rules.ignores("sub/.git/config")
    assert not rules.ignores("infer.py")


def test_a_cogignore_that_is_not_text_is_an_error(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / ".cogignore").write_bytes(b"\xff\xfe*.log\n")
    with pytest.raises(PackageError, match=r"\.cogignore"):
        package_files(root)


def test_the_zip_being_written_inside_the_tree_is_not_included(tmp_path):
    root = make_tree(tmp_path / "m")
    outside = id_of(root)
    with open(root / "package.zip", "wb") as out:
        inside = write_package(root, out)
    assert inside == outside
    with zipfile.ZipFile(root / "package.zip") as zf:
        assert "package.zip" not in zf.namelist()


def test_a_link_to_a_file_inside_the_tree_is_stored_as_that_file(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / "latest.bin").symlink_to("weights/model.bin")
    data, _ = package_of(root)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("latest.bin")
        assert info.external_attr >> 16 == 0o100644  # a regular file, not a link
        assert zf.read(info) == (root / "weights" / "model.bin").read_bytes()


@pytest.mark.parametrize(
    "make_link, words",
    [
        pytest.param(
            lambda root, outside: (root / "w.bin").symlink_to(outside / "secret.bin"),
            "outside the package directory",
            id="to a file outside",
        ),
        pytest.param(
            lambda root, outside: (root / "w.bin").symlink_to("../../outside/secret.bin"),
            "outside the package directory",
            id="relative, escaping",
        ),
        pytest.param(
            lambda root, outside: (root / "w.bin").symlink_to("nowhere.bin"),
            "does not exist",
            id="dangling",
        ),
        pytest.param(
            lambda root, outside: (root / "w.bin").symlink_to("weights"),
            "to a directory",
            id="to a directory inside",
        ),
        pytest.param(
            lambda root, outside: (root / "w.bin").symlink_to(outside),
            "outside the package directory",
            id="to a directory outside",
        ),
    ],
)
def test_other_links_are_refused_naming_the_link(tmp_path, make_link, words):
    root = make_tree(tmp_path / "pkg" / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"not yours")
    make_link(root, outside)
    for attempt in (lambda: package_files(root), lambda: package_of(root)):
        with pytest.raises(PackageError, match=words) as caught:
            attempt()
        assert "w.bin" in str(caught.value)
    # Listing the link in .cogignore is the way out.
    (root / ".cogignore").write_text("w.bin\n")
    assert "w.bin" not in package_files(root)
    assert is_package_id(id_of(root))


def test_special_files_are_refused_unless_ignored(tmp_path):
    root = make_tree(tmp_path / "m")
    os.mkfifo(root / "events.fifo")
    with pytest.raises(PackageError, match=r"events\.fifo.*not a regular file"):
        package_of(root)
    (root / ".cogignore").write_text("*.fifo\n")
    assert "events.fifo" not in package_files(root)


@pytest.mark.parametrize(
    "name, words",
    [(b"back\\slash.txt", "backslash"), (b"bad\xffname.txt", "UTF-8"), (b"tab\there", "control")],
)
def test_file_names_the_server_would_refuse_are_refused_here(tmp_path, name, words):
    root = make_tree(tmp_path / "m")
    with open(os.path.join(os.fsencode(root), name), "wb") as f:
        f.write(b"x")
    with pytest.raises(PackageError, match=words):
        package_of(root)


def test_no_cog_yaml_is_an_error(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / "cog.yaml").unlink()
    with pytest.raises(PackageError, match=r"no cog\.yaml"):
        package_of(root)


def test_an_ignored_cog_yaml_is_an_error_that_says_so(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / ".cogignore").write_text("*.yaml\n")
    with pytest.raises(PackageError, match=r"cog\.yaml is excluded by \.cogignore"):
        package_of(root)


def test_a_root_that_is_not_a_directory_is_an_error(tmp_path):
    with pytest.raises(PackageError, match="missing does not exist"):
        package_of(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PackageError, match="not a directory"):
        package_of(tmp_path / "file")


# -- streaming, progress, files changing underneath -----------------------------------------


def test_progress_counts_input_bytes_up_to_the_total(tmp_path):
    root = make_tree(tmp_path / "m")
    (root / "weights" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    calls: list[tuple[int, int]] = []
    write_package(root, io.BytesIO(), lambda done, total: calls.append((done, total)))
    total = sum((root / name).stat().st_size for name in package_files(root))
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len(calls) > 4  # the big file reports per chunk, not only when it is finished


def test_a_large_file_is_streamed_in_bounded_memory(tmp_path):
    root = make_tree(tmp_path / "m")
    size = 64 * 1024 * 1024
    with open(root / "weights" / "large.bin", "wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(size // len(block)):
            f.write(block)
    out_path = tmp_path / "pkg.zip"
    tracemalloc.start()
    try:
        with open(out_path, "wb") as out:
            package_id = write_package(root, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak Python allocations {peak} bytes for a {size}-byte file"
    assert out_path.stat().st_size > size
    assert hashlib.sha256(out_path.read_bytes()).hexdigest() == package_id


def test_a_file_changed_while_packaging_is_an_error(tmp_path):
    root = make_tree(tmp_path / "m")
    big = root / "weights" / "big.bin"
    big.write_bytes(b"a" * (3 * 1024 * 1024))

    def rewrite(done, total):  # runs between chunks of the copy: a real concurrent writer
        if 1024 * 1024 <= done < total:
            with open(big, "r+b") as f:
                f.seek(2 * 1024 * 1024)
                f.write(b"b" * 1024)

    with pytest.raises(PackageError, match=r"big\.bin changed while it was being packaged"):
        write_package(root, io.BytesIO(), rewrite)


def test_a_file_truncated_while_packaging_is_an_error(tmp_path):
    root = make_tree(tmp_path / "m")
    big = root / "weights" / "big.bin"
    big.write_bytes(b"a" * (3 * 1024 * 1024))

    def truncate(done, total):
        if 1024 * 1024 <= done < total:
            os.truncate(big, 10)

    with pytest.raises(PackageError, match=r"big\.bin changed"):
        write_package(root, io.BytesIO(), truncate)


def test_a_full_disk_is_a_clear_error(tmp_path):
    root = make_tree(tmp_path / "m")

    def package_to_a_full_disk():
        with open("/dev/full", "wb", buffering=0) as full:  # a real device, always full
            write_package(root, full)

    with pytest.raises(PackageError, match="cannot write the package: No space left"):
        package_to_a_full_disk()


class ShortWrites(io.RawIOBase):
    """A sink that takes at most 1000 bytes per write, as raw files and sockets may.

    A fake, because no real file on this machine writes short on demand.
    """

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        taken = bytes(b[:1000])
        self.data += taken
        return len(taken)


def test_short_writes_are_completed(tmp_path):
    root = make_tree(tmp_path / "m")
    expected, expected_id = package_of(root)
    sink = ShortWrites()
    assert write_package(root, sink) == expected_id
    assert bytes(sink.data) == expected


@pytest.mark.slow
def test_a_member_over_4_gib_round_trips(tmp_path):
    # The real ZIP64 case: a sparse 4 GiB + 1 byte file (no disk used for the source).
    root = make_tree(tmp_path / "m")
    huge = root / "weights" / "huge.bin"
    size = 4 * 1024**3 + 1
    with open(huge, "wb") as f:
        f.seek(size - 1)
        f.write(b"!")
    # In memory where there is room (the 4 GiB are written once and read three times):
    # the test is about the format, not the disk.
    shm = Path("/dev/shm")
    fast = shm.is_dir() and shutil.disk_usage(shm).free > 6 * 1024**3
    zip_path = (shm if fast else tmp_path) / f"cog-test-{os.getpid()}-pkg.zip"
    try:
        with open(zip_path, "wb") as out:
            package_id = write_package(root, out)
        # open() decompresses and CRC-checks every member, the huge one included
        with PackageArchive.open(zip_path, PackageLimits(max_ratio=1e9)) as archive:
            members = {m.name: m.size for m in archive.iter_members()}
            assert members["weights/huge.bin"] == size
            assert members["weights/model.bin"] == 256 * 64  # its offset is over 4 GiB
        if shutil.which("unzip"):
            result = subprocess.run(["unzip", "-t", str(zip_path)], capture_output=True)
            assert result.returncode == 0, result.stdout + result.stderr
        # The ID is the hash of what was written (checked on every size by the tests
        # above); a second hash of these 4 GiB would check nothing new.
        assert len(package_id) == 64
    finally:
        zip_path.unlink(missing_ok=True)  # do not leave 4 GiB behind in pytest's tmp dirs
