"""cog.yaml: the schema, and the three pure steps load -> validate -> complete.

(Skeleton: data classes only; the load/validate/complete functions are being written.)
"""

from __future__ import annotations

import attrs

ARCHITECTURES = ("cpu", "gpu")
DEFAULT_PYTHON_VERSION = "3.11"


@attrs.frozen
class Environment:
    python_version: str = DEFAULT_PYTHON_VERSION
    python_requirements: str = ""
    python_packages: tuple[str, ...] = ()
    system_packages: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ("cpu",)
    cuda: str = ""
    cudnn: str = ""


@attrs.frozen
class Example:
    #: input name -> literal value, or "@path" of a file inside the package
    input: dict[str, str] = attrs.field(factory=dict)
    #: expected output: text, or "@path" of a file inside the package; None: not checked
    output: str | None = None


@attrs.frozen
class Config:
    model: str
    name: str = ""
    environment: Environment = attrs.field(factory=Environment)
    examples: tuple[Example, ...] = ()
