"""Import the model's class named in cog.yaml (``infer.py:Model``, ``predict.py:Predictor``)
and read its signature: a 2021 ``cog.Model`` or a predictor of today's Cog.

Standard library only: this runs in the model's own Python.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import sysconfig
from typing import Any, Tuple

from cog.model import Model, signature_of
from cog.predictor import method_name, predictor_signature
from cog.signature import Signature


class ModelLoadError(Exception):
    """The model cannot be found or imported; the message says which file and why."""


def parse_reference(reference: str) -> Tuple[str, str]:
    """``"infer.py:Model"`` -> ("infer.py", "Model"); ModelLoadError otherwise."""
    file, sep, class_name = reference.rpartition(":")
    if not sep or not file.endswith(".py") or not class_name.isidentifier():
        raise ModelLoadError(
            "the model must look like 'predict.py:Predictor' or 'infer.py:Model' (a Python "
            f"file and a class), not {reference!r}"
        )
    return file, class_name


def load_reference(directory: str, reference: str) -> type:
    """The class of ``"predict.py:Predictor"`` (a file in ``directory``) or of
    ``"package.module:Class"`` (an importable module: how a server embedded in a program
    is given a class it imported itself)."""
    module_name, sep, qualname = reference.rpartition(":")
    if sep and not module_name.endswith(".py") and module_name.replace(".", "").isidentifier():
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if not isinstance(target, type):
            raise ModelLoadError(f"{module_name} has no class {qualname}")
        return target
    return load_class(directory, *parse_reference(reference))


def load_class(directory: str, file: str, class_name: str) -> type:
    """Import the file and return the class.

    The file's directory goes on ``sys.path`` (a model imports its sibling modules). The
    module is registered under its own name (``infer``), as ``import infer`` would do: a
    sibling's ``from infer import x`` gets this module rather than a second copy, and
    processes started with spawn (a DataLoader's workers, say) can import what they
    unpickle. A file named like a module that is imported already or part of the standard
    library (``queue.py``, ``json.py``) gets a private name instead (``_cog_model_queue``),
    so it replaces nothing that is imported later. Raises ModelLoadError, or what the
    module itself raises.
    """
    path = os.path.abspath(os.path.join(directory, file))
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {file} not found in {directory}")
    folder = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = stem
    if not stem.isidentifier() or stem in sys.modules or _in_standard_library(stem):
        module_name = "_cog_model_" + re.sub(r"\W", "_", stem)  # a dot means a package
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    model_class = getattr(module, class_name, None)
    if not isinstance(model_class, type):
        raise ModelLoadError(f"{file} has no class {class_name}")
    return model_class


def describe(model_class: type) -> Tuple[Signature, str, bool]:
    """The class's signature, the name of its method and whether that is async.

    A ``cog.Model`` subclass is a 2021 model (``run()``); any other class a predictor.
    Raises SignatureError.
    """
    if issubclass(model_class, Model):
        return signature_of(model_class), "run", False
    name = method_name(model_class)
    signature = predictor_signature(model_class)
    method = getattr(model_class, name)
    is_async = inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)
    return signature, name, is_async


def setup_arguments(instance: Any) -> dict:
    """``weights`` for a ``setup(self, weights)``: $COG_WEIGHTS (a URL, or a path), else
    ./weights if it exists, else None, as Cog passes it."""
    try:
        parameters = inspect.signature(instance.setup).parameters
    except (TypeError, ValueError):
        return {}
    if "weights" not in parameters:
        return {}
    from cog.types import Path

    weights: Any = os.environ.get("COG_WEIGHTS") or None
    if weights is not None and not weights.startswith(("http://", "https://", "data:")):
        weights = Path(weights)
    elif weights is None and os.path.exists("weights"):
        weights = Path("weights")
    return {"weights": weights}


def _in_standard_library(name: str) -> bool:
    """Whether ``name`` is a module of Python's standard library."""
    names = getattr(sys, "stdlib_module_names", None)  # Python 3.10 and newer
    if names is not None:
        return name in names
    if name in sys.builtin_module_names:
        return True
    # Python 3.8 and 3.9: look only where the standard library lives.
    stdlib = sysconfig.get_paths()["stdlib"]
    places = [stdlib, os.path.join(stdlib, "lib-dynload")]
    return importlib.machinery.PathFinder.find_spec(name, places) is not None
