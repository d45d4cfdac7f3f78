"""Package IDs and the prefixes people type for them."""

from __future__ import annotations

import hashlib

import pytest

from cog.package import SHORT_ID_LENGTH, check_prefix, is_package_id, short_id

SOME_ID = hashlib.sha256(b"some package").hexdigest()


def test_short_id_is_the_first_twelve_characters():
    assert short_id(SOME_ID) == SOME_ID[:12]
    assert len(short_id(SOME_ID)) == SHORT_ID_LENGTH == 12


@pytest.mark.parametrize(
    "candidate, expected",
    [
        (SOME_ID, True),
        (SOME_ID.upper(), False),  # IDs are canonical lowercase; callers lowercase input
        (SOME_ID[:-1], False),
        (SOME_ID + "0", False),
        (SOME_ID[:-1] + "g", False),
        ("", False),
    ],
)
def test_is_package_id(candidate, expected):
    assert is_package_id(candidate) is expected


@pytest.mark.parametrize("ref", [SOME_ID, SOME_ID[:7], SOME_ID[:20], SOME_ID[:9].upper()])
def test_check_prefix_accepts_ids_and_long_enough_prefixes(ref):
    assert check_prefix(ref) == ref.lower()
    assert SOME_ID.startswith(check_prefix(ref))


@pytest.mark.parametrize(
    "ref, words",
    [
        ("", "no package ID"),
        ("abc123", "too short"),
        (SOME_ID[:6], "at least 7"),
        ("hello-world", "hexadecimal"),
        ("../../etc", "hexadecimal"),
        (SOME_ID + "ab", "64 characters"),
    ],
)
def test_check_prefix_refuses_with_a_clear_message(ref, words):
    with pytest.raises(ValueError, match=words):
        check_prefix(ref)
