"""The wire format of a config: the original Cog's Go-style document (``Name``,
``Environment`` {``PythonVersion``...}, ``Model``), empty lists as ``null`` like Go's nil
slices; today's keys (``Concurrency``, ``EnvironmentVariables``, ``Format``, ``Run``) only
when set, so a 2021 config's document is exactly the seed's."""

from __future__ import annotations

from typing import Any

import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from cog.config import Config, Environment, Example
from cog.config_formats import MODEL_FORMAT

_wire = cattrs.Converter()
_GO_KEYS = {
    Environment: {
        "python_version": "PythonVersion",
        "python_requirements": "PythonRequirements",
        "python_packages": "PythonPackages",
        "system_packages": "SystemPackages",
        "architectures": "Architectures",
        "cuda": "CUDA",
        "cudnn": "CuDNN",
        "run": "Run",
    },
    Example: {"input": "Input", "output": "Output"},
    Config: {
        "name": "Name",
        "environment": "Environment",
        "model": "Model",
        "examples": "Examples",
        "concurrency": "Concurrency",
        "variables": "EnvironmentVariables",
        "format": "Format",
    },
}
# Go's nil slices: empty lists travel as null, and null reads back as empty.
_STRINGS, _EXAMPLES = tuple[str, ...], tuple[Example, ...]
_wire.register_unstructure_hook_func(lambda t: t == _STRINGS, lambda v: list(v) or None)
_wire.register_unstructure_hook_func(
    lambda t: t == _EXAMPLES, lambda v: [_wire.unstructure(e, Example) for e in v] or None
)
_wire.register_structure_hook_func(lambda t: t == _STRINGS, lambda v, _: tuple(v or ()))
_wire.register_structure_hook_func(
    lambda t: t == _EXAMPLES, lambda v, _: tuple(_wire.structure(e, Example) for e in v or ())
)
for _cls, _keys in _GO_KEYS.items():
    _overrides = {field: override(rename=key) for field, key in _keys.items()}
    _wire.register_unstructure_hook(_cls, make_dict_unstructure_fn(_cls, _wire, **_overrides))
    _wire.register_structure_hook(_cls, make_dict_structure_fn(_cls, _wire, **_overrides))


#: Keys of today's format left out at their defaults: a 2021 config's document is exactly
#: the seed's.
_OMITTED_AT_DEFAULT = {"Concurrency": 1, "EnvironmentVariables": None, "Format": MODEL_FORMAT}


def config_to_json(config: Config) -> dict[str, Any]:
    doc = _wire.unstructure(config)
    for key, default in _OMITTED_AT_DEFAULT.items():
        if doc.get(key) == default:
            del doc[key]
    if doc["Environment"].get("Run") is None:
        del doc["Environment"]["Run"]
    return doc


def config_from_json(doc: dict[str, Any]) -> Config:
    return _wire.structure(doc, Config)
