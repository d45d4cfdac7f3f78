"""What a cog.yaml may hold: the bounds an uploaded config meets before it is parsed, and
the rules for the names in it that reach other programs.

Every package is an uploader's, and a config is parsed by the server: its size, its
nesting and its number of values (aliases expanded) are bounded, so that reading one
costs a bounded time and memory. They are checked on YAML's event stream, which is read
without recursion and without expanding aliases, before anything builds a document of
it. The bounds are far above what a model needs.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import yaml

from cog.units import format_size

#: the largest cog.yaml
MAX_CONFIG_BYTES = 256 * 1024
#: how deep mappings and lists may nest (a cog.yaml needs four or five)
MAX_DEPTH = 20
#: how many values a cog.yaml may hold, its aliases expanded
MAX_VALUES = 20_000
#: how many examples the check may be asked to run
MAX_EXAMPLES = 100
#: the longest image name (a registry takes 255 with its own address before it)
MAX_NAME = 255
#: the largest model file the server reads (to find its class and inputs)
MAX_MODEL_SOURCE = 1024 * 1024
#: the Pythons cog knows, by minor version: 3.8 (the runtime's oldest) to 3.15
PYTHON_MINORS = range(8, 16)

#: libyaml's loader where PyYAML has it (its wheels do): the same YAML, read many times
#: faster, so a config at the bounds holds a worker thread (and the GIL) for milliseconds
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: what a Dockerfile's COPY reads as a pattern (* ? [ ] \) or a variable ($)
_DOCKERFILE_SPECIAL = re.compile(r"[*?\[\]\\$]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shape_problems(text: str | bytes, source: str = "cog.yaml") -> list[str]:
    """What makes a config too big to read: its size, nesting or number of values. YAML
    that does not parse is left for the loader to report, with its position."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_CONFIG_BYTES:
        return [f"{source} is {format_size(size)}; at most {format_size(MAX_CONFIG_BYTES)}"]
    depth = values = 0
    #: per open collection: its anchor and the count of values when it began
    opened: list[tuple[str | None, int]] = []
    #: per anchor: how many values an alias to it stands for
    anchored: dict[str, int] = {}
    try:
        for event in yaml.parse(text, Loader=YAML_LOADER):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                values += 1
                if depth > MAX_DEPTH:
                    line = event.start_mark.line + 1
                    return [f"{source}: line {line}: nested more than {MAX_DEPTH} deep"]
                opened.append((event.anchor, values))
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
                anchor, began = opened.pop()
                if anchor:
                    anchored[anchor] = values - began + 1
            elif isinstance(event, yaml.ScalarEvent):
                values += 1
                if event.anchor:
                    anchored[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                values += anchored.get(event.anchor, 1)
            if values > MAX_VALUES:
                return [
                    f"{source}: more than {MAX_VALUES:,} values once its aliases are "
                    "expanded; a cog.yaml needs far fewer"
                ]
    except yaml.YAMLError:
        return []
    return []


def plain_path_problem(path: str) -> str | None:
    """Why path is not a plain relative path of a package file ("a/b.txt": no leading
    "/", no "..", "." or empty parts, no backslashes or control characters), or None. A
    plain path names one file everywhere: in the zip, on disk, in the image."""
    posix = PurePosixPath(path)
    if (
        not path
        or posix.is_absolute()
        or "\\" in path
        or _CONTROL.search(path)
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        return (
            f"{path!r} must be a plain path inside the package (like 'dir/file.txt': no '..', "
            "'.' or empty parts, not absolute)"
        )
    return None


def dockerfile_problem(path: str) -> str | None:
    """Why a package path cannot be named in a Dockerfile as it is, or None: COPY reads
    * ? [ ] \\ as a pattern and $ as a variable, so such a name would copy other files."""
    if _DOCKERFILE_SPECIAL.search(path):
        return (
            f"{path!r} has characters a Dockerfile reads as a pattern or a variable "
            "(* ? [ ] \\ $); rename the file"
        )
    return None
