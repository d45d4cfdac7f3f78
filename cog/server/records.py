"""The package record: what the cog server knows about one package, and its JSON document.

The document keeps the seed's keys exactly (``ID``, ``Name``, ``Artifacts`` with
``Target``/``URI``, ``Config`` with ``Environment``/``Model``) and adds ``Created``,
``Updated``, ``Status``, ``Size``, ``Examples``, ``Signature``, ``Error`` and
``UploadedBy`` (the name of the token that uploaded it: an audit trail, never a secret).

A listing carries each package's :class:`PackageSummary` (the document without
``Config``, ``Examples`` and ``Signature``, which may be large): it stays small however
big the packages' configs are. Records are
stored as these documents, so what a server writes is exactly what every API client reads.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any

import attrs

from cog.config import Config
from cog.config_wire import config_from_json, config_to_json


class Status(str, enum.Enum):
    #: stored, images being built and checked
    BUILDING = "building"
    #: images built, pushed and checked (or no builder configured: stored only)
    READY = "ready"
    #: a build or check failed; the package is kept, its log explains why
    FAILED = "failed"


@attrs.frozen
class Artifact:
    #: docker-cpu or docker-gpu
    target: str
    #: repository:tag as pushed
    uri: str
    #: registry manifest digest (sha256:...)
    digest: str = ""


@attrs.frozen
class PackageRecord:
    id: str
    name: str
    config: Config
    created: dt.datetime
    updated: dt.datetime
    status: Status
    size: int
    artifacts: tuple[Artifact, ...] = ()
    #: the model's input signature ({"arguments": {...}}) once known
    signature: dict[str, Any] | None = None
    #: why the last build failed
    error: str = ""
    #: who uploaded it: the name of the caller's token ("anonymous" on an open server)
    uploaded_by: str = ""

    def evolve(self, *, updated: dt.datetime, **changes: Any) -> PackageRecord:
        """This record changed at `updated` (the caller's clock)."""
        return attrs.evolve(self, updated=updated, **changes)


@attrs.frozen
class PackageSummary:
    """What a listing says of a package, and what the catalog's index keeps of it."""

    id: str
    name: str
    status: Status
    created: dt.datetime
    updated: dt.datetime
    size: int
    artifacts: tuple[Artifact, ...] = ()
    error: str = ""
    uploaded_by: str = ""


SUMMARY_KEYS = ("ID", "Name", "Status", "Created", "Updated", "Size", "Artifacts", "Error")


def summary_from_json(doc: dict[str, Any]) -> PackageSummary:
    """The summary of a stored document, without reading its config."""
    return PackageSummary(
        id=doc["ID"],
        name=doc["Name"],
        status=Status(doc["Status"]),
        created=_parse_timestamp(doc["Created"]),
        updated=_parse_timestamp(doc.get("Updated") or doc["Created"]),
        size=int(doc["Size"]),
        artifacts=_artifacts(doc),
        error=doc.get("Error") or "",
        uploaded_by=doc.get("UploadedBy") or "",
    )


def summary_to_json(summary: PackageSummary) -> dict[str, Any]:
    return {
        "ID": summary.id,
        "Name": summary.name,
        "Status": summary.status.value,
        "Created": _timestamp(summary.created),
        "Updated": _timestamp(summary.updated),
        "Size": summary.size,
        "Artifacts": [
            {"Target": a.target, "URI": a.uri, "Digest": a.digest} for a in summary.artifacts
        ],
        "Error": summary.error,
        "UploadedBy": summary.uploaded_by,
    }


def encode_summary(summary: PackageSummary) -> bytes:
    return json.dumps(summary_to_json(summary), separators=(",", ":")).encode()


def summarize(record: PackageRecord) -> PackageSummary:
    return PackageSummary(
        id=record.id,
        name=record.name,
        status=record.status,
        created=record.created,
        updated=record.updated,
        size=record.size,
        artifacts=record.artifacts,
        error=record.error,
        uploaded_by=record.uploaded_by,
    )


def _artifacts(doc: dict[str, Any]) -> tuple[Artifact, ...]:
    return tuple(
        Artifact(target=a["Target"], uri=a["URI"], digest=a.get("Digest", ""))
        for a in doc.get("Artifacts") or ()
    )


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _timestamp(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_timestamp(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def record_to_json(record: PackageRecord) -> dict[str, Any]:
    config = config_to_json(record.config)
    return {
        "ID": record.id,
        "Name": record.name,
        "Status": record.status.value,
        "Created": _timestamp(record.created),
        "Updated": _timestamp(record.updated),
        "Size": record.size,
        "Artifacts": [
            {"Target": a.target, "URI": a.uri, "Digest": a.digest} for a in record.artifacts
        ],
        "Config": config,
        "Examples": config.get("Examples"),
        "Signature": record.signature,
        "Error": record.error,
        "UploadedBy": record.uploaded_by,
    }


#: the keys of a package in a listing: enough for a list, not the whole document
def record_from_json(doc: dict[str, Any]) -> PackageRecord:
    return PackageRecord(
        id=doc["ID"],
        name=doc["Name"],
        config=config_from_json(doc["Config"]),
        created=_parse_timestamp(doc["Created"]),
        updated=_parse_timestamp(doc.get("Updated") or doc["Created"]),
        status=Status(doc["Status"]),
        size=int(doc["Size"]),
        artifacts=_artifacts(doc),
        signature=doc.get("Signature"),
        error=doc.get("Error") or "",
        uploaded_by=doc.get("UploadedBy") or "",
    )


def encode_record(record: PackageRecord) -> bytes:
    return json.dumps(record_to_json(record), separators=(",", ":")).encode()


def decode_record(data: bytes) -> PackageRecord:
    return record_from_json(json.loads(data))
