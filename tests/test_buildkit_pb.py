"""The BuildKit messages: the committed .proto text and the descriptors built at import
agree field by field, and the wire encoding uses BuildKit's field numbers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from google.protobuf import descriptor_pb2

from cog.builders.buildkit import pb as buildkit_pb
from cog.builders.buildkit.pb import messages as pb

PROTO = Path(buildkit_pb.__file__).with_name("control.proto")
_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {_F.TYPE_STRING: "string", _F.TYPE_BYTES: "bytes", _F.TYPE_BOOL: "bool"}
_TYPES[_F.TYPE_INT64] = "int64"


def parse_proto(text: str) -> tuple[dict, dict]:
    """{package.Message: {field: (type, number)}}, {rpc: (request, response, streaming)}."""
    text = re.sub(r"//[^\n]*", "", text)
    messages: dict[str, dict[str, tuple[str, int]]] = {}
    rpcs: dict[str, tuple[str, str, bool]] = {}
    package = ""
    for match in re.finditer(r"package\s+([\w.]+);|message\s+(\w+)\s*\{([^}]*)\}", text):
        if match.group(1):
            package = match.group(1)
            continue
        fields = {}
        for field in re.finditer(r"([\w.<>, ]+?)\s+(\w+)\s*=\s*(\d+);", match.group(3)):
            kind = re.sub(r"\s+", " ", field.group(1).strip()).replace(", ", ",")
            fields[field.group(2)] = (kind, int(field.group(3)))
        messages[f"{package}.{match.group(2)}"] = fields
    for match in re.finditer(r"rpc\s+(\w+)\((\w+)\)\s+returns\s+\((stream\s+)?(\w+)\)", text):
        rpcs[match.group(1)] = (match.group(2), match.group(4), bool(match.group(3)))
    return messages, rpcs


def _spec(field, package: str) -> str:
    """A descriptor field written as the .proto text writes it (relative names resolved)."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (_TYPES[f.type] for f in field.message_type.fields)
        return f"map<{key},{value}>"
    if field.message_type is not None:
        message = field.message_type
        same_package = message.file.package == package
        kind = message.full_name.removeprefix(f"{package}.") if same_package else message.full_name
    else:
        kind = _TYPES[field.type]
    # protobuf >= 5.28 has is_repeated; older runtimes only label
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        repeated = field.label == _F.LABEL_REPEATED
    return f"repeated {kind}" if repeated else kind


def test_proto_text_and_descriptors_agree():
    declared, rpcs = parse_proto(PROTO.read_text())
    built = {}
    for (_, package, _), specs in buildkit_pb.SCHEMA.items():
        for name in specs:
            descriptor = buildkit_pb.POOL.FindMessageTypeByName(f"{package}.{name}")
            built[descriptor.full_name] = {
                f.name: (_spec(f, package), f.number) for f in descriptor.fields
            }
    assert built == declared
    service = buildkit_pb.POOL.FindServiceByName(buildkit_pb.SERVICE)
    assert {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods
    } == rpcs


def test_wire_format_uses_buildkits_field_numbers():
    # Tag byte = field number << 3 | wire type 2 (length-delimited).
    assert pb.SolveRequest(Ref="r").SerializeToString() == b"\x0a\x01r"
    assert pb.SolveRequest(Exporter="moby").SerializeToString() == b"\x1a\x04moby"
    assert pb.SolveRequest(Frontend="f").SerializeToString() == b"\x32\x01f"
    attrs = pb.SolveRequest(FrontendAttrs={"k": "v"}).SerializeToString()
    assert attrs == b"\x3a\x06\x0a\x01k\x12\x01v"
    log = pb.VertexLog.FromString(b"\x0a\x02vx\x18\x02\x22\x03hi\n")
    assert (log.vertex, log.stream, log.msg) == ("vx", 2, b"hi\n")


def test_unknown_fields_from_newer_buildkits_are_skipped():
    # A Vertex with a field 8 (progressGroup in newer BuildKits) we do not declare.
    vertex = pb.Vertex.FromString(b"\x1a\x03RUN" + b"\x42\x02\x0a\x00" + b"\x20\x01")
    assert vertex.name == "RUN" and vertex.cached is True


def test_messages_live_in_a_private_pool():
    from google.protobuf import descriptor_pool

    default = descriptor_pool.Default()
    try:
        default.FindMessageTypeByName("moby.buildkit.v1.SolveRequest")
    except KeyError:
        return
    raise AssertionError("BuildKit messages leaked into the default descriptor pool")


#: The names the builder's modules give BuildKit's messages (requests they make, responses
#: and their parts they read); only attribute access on these counts as using a field.
MESSAGE_VARIABLES = frozenset(
    {"request", "response", "update", "log", "status", "warning", "worker", "info"}
)


def _is_message(node: ast.expr) -> bool:
    """A message: one of MESSAGE_VARIABLES, a field of one (``info.buildkitVersion``), or
    what a call answers (``(await call(...)).record``)."""
    if isinstance(node, ast.Name):
        return node.id in MESSAGE_VARIABLES
    if isinstance(node, ast.Attribute):
        return _is_message(node.value)
    return isinstance(node, ast.Await)


def fields_used(source: str) -> set[str]:
    """Field names a module reads or sets on a message: ``update.name``,
    ``update.HasField("started")``, and keywords of ``pb.Message(...)`` and of
    ``request.Cache.Imports.add(...)``."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_message(node.value):
            used.add(node.attr)
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        if func.attr == "HasField" and _is_message(func.value):
            used.update(a.value for a in node.args if isinstance(a, ast.Constant))
        made = isinstance(func.value, ast.Name) and func.value.id == "pb"
        if made or (func.attr == "add" and _is_message(func.value)):
            used.update(k.arg for k in node.keywords if k.arg)
    return used


def test_every_declared_field_is_one_cog_uses():
    """The schema covers only what cog sends or reads (no Session: the context is a URL;
    no Entitlements: cog's Dockerfiles need none). A field cog stops using goes too.

    Used means accessed on a message variable (MESSAGE_VARIABLES) in a module of
    cog.builders.buildkit (the schema's own, pb, aside), so a same-named attribute of
    anything else (``vertex.name`` of the progress's own record) does not count. Its
    limits: fields are matched by name, not by message, so a name two messages share
    (``name``, ``vertex``, ``completed``) counts for both once either is used; and so does
    an attribute of a non-message under one of those variable names (``request.image`` of
    a BuildRequest).
    """
    package = Path(buildkit_pb.__file__).parent.parent
    used = set().union(*(fields_used(module.read_text()) for module in package.glob("*.py")))
    unused = [
        f"{name}.{field}"
        for specs in buildkit_pb.SCHEMA.values()
        for name, fields in specs.items()
        for _, field, _ in fields
        if field not in used
    ]
    assert unused == []
    assert not {f.name for f in pb.SolveRequest.DESCRIPTOR.fields} & {"Session", "Entitlements"}
