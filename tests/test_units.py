"""Byte sizes: one way to read them, one way to show them."""

from __future__ import annotations

import pytest

from cog.units import GiB, MiB, format_size, parse_size


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (8 * MiB, "8.0 MiB"),
     (4 * GiB, "4.0 GiB"), (5000 * GiB, "4.9 TiB")],
)  # fmt: skip
def test_format_size(size, shown):
    assert format_size(size) == shown


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", MiB), ("4GiB", 4 * GiB), ("4Gi", 4 * GiB), ("4G", 4 * 10**9),
     ("4gb", 4 * 10**9), ("500MiB", 500 * MiB), ("1.5KiB", 1536), (" 8 MiB ", 8 * MiB),
     ("2k", 2000), ("3b", 3)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "4 apples", "-1", "4iB", "1e6"])
def test_parse_size_refuses_what_is_no_size(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
