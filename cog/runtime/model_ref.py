"""Which class is the model: cog.yaml's ``model: "infer.py:Model"``, and loading it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
import sysconfig

import attrs
import yaml

from cog.model import Model, signature_of

CONFIG_FILE = "cog.yaml"


class ModelLoadError(Exception):
    """The model cannot be found or imported; the message says which file and why."""


@attrs.frozen
class ModelRef:
    """A model class named by a Python file (relative to ``directory``) and a class name."""

    file: str
    class_name: str
    directory: str = "."

    @classmethod
    def parse(cls, reference: str, directory: str = ".") -> ModelRef:
        """``"infer.py:Model"`` -> ModelRef."""
        file, sep, class_name = reference.rpartition(":")
        if not sep or not file.endswith(".py") or not class_name.isidentifier():
            raise ModelLoadError(
                f"model must look like 'infer.py:Model' (a Python file and a class), "
                f"not {reference!r}"
            )
        return cls(file, class_name, directory)

    @classmethod
    def from_directory(cls, directory: str = ".") -> ModelRef:
        """The model named by ``directory/cog.yaml``."""
        path = os.path.join(directory, CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
        except FileNotFoundError:
            raise ModelLoadError(f"{path} not found") from None
        except yaml.YAMLError as e:
            raise ModelLoadError(f"{path} is not valid YAML: {e}") from None
        reference = config.get("model") if isinstance(config, dict) else None
        if not isinstance(reference, str):
            raise ModelLoadError(f'{path} does not name the model (model: "infer.py:Model")')
        return cls.parse(reference, directory)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.file)

    def load(self) -> type[Model]:
        """Import the file and return the class, its declarations checked.

        The file's directory goes on ``sys.path`` (a model imports its sibling modules).
        The module is registered under its own name (``infer``), as ``import infer`` would
        do: a sibling's ``from infer import x`` gets this module rather than a second copy,
        and processes started with spawn (a DataLoader's workers, say) can import what they
        unpickle. A file named like a module that is imported already or part of the
        standard library (``queue.py``, ``json.py``) gets a private name instead
        (``_cog_model_queue``), so it replaces nothing that is imported later. Raises
        ModelLoadError, or SignatureError for wrongly declared inputs.
        """
        path = os.path.abspath(self.path)
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file {self.file} not found in {self.directory}")
        folder = os.path.dirname(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        module_name = stem
        if not stem.isidentifier() or stem in sys.modules or _in_standard_library(stem):
            module_name = "_cog_model_" + re.sub(r"\W", "_", stem)  # a dot means a package
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"cannot import {self.file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        model_class = getattr(module, self.class_name, None)
        if model_class is None:
            raise ModelLoadError(f"{self.file} has no class {self.class_name}")
        if not (isinstance(model_class, type) and issubclass(model_class, Model)):
            raise ModelLoadError(f"{self.file}:{self.class_name} is not a subclass of cog.Model")
        signature_of(model_class)
        return model_class


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
