"""Packages: the deterministic zip of a model directory, its ID, and the safe reading of one.

:mod:`~cog.package.selection` decides which files go in, :mod:`~cog.package.writer`
writes the zip (client side), :mod:`~cog.package.scan` checks its members as an upload
streams in and :mod:`~cog.package.archive` opens an uploaded one (server side), and
:mod:`~cog.package.ids` handles the IDs.
"""

from __future__ import annotations

from cog.package.archive import InvalidPackage, MemberInfo, PackageArchive, PackageLimits
from cog.package.ids import (
    MIN_PREFIX_LENGTH,
    PACKAGE_ID_LENGTH,
    SHORT_ID_LENGTH,
    check_prefix,
    is_package_id,
    short_id,
)
from cog.package.selection import (
    DEFAULT_IGNORES,
    IGNORE_FILE,
    PackageError,
    PackageIgnore,
    package_files,
)
from cog.package.writer import PackagePlan, package_chunks, plan_package, write_package
from cog.package.zipformat import CONFIG_NAME, member_name_problem

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_IGNORES",
    "IGNORE_FILE",
    "MIN_PREFIX_LENGTH",
    "PACKAGE_ID_LENGTH",
    "SHORT_ID_LENGTH",
    "InvalidPackage",
    "MemberInfo",
    "PackageArchive",
    "PackageError",
    "PackageIgnore",
    "PackageLimits",
    "PackagePlan",
    "check_prefix",
    "is_package_id",
    "member_name_problem",
    "package_chunks",
    "package_files",
    "plan_package",
    "short_id",
    "write_package",
]
