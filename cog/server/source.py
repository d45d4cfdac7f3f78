"""A model's signature read from its source with :mod:`ast`, never imported, so the server
can check a package's declarations and compare them with what its image reports: a 2021
model's ``@cog.input`` declarations here, a predictor's annotations in
:mod:`cog.server.predictor_source`."""

from __future__ import annotations

import ast
import pathlib
from typing import Any, Union

import attrs

from cog.declarations import InputDeclaration, RunParameters, build_signature
from cog.model import METHODS
from cog.server.predictor_source import is_predictor_class, static_predictor_signature
from cog.signature import Signature, SignatureError

_INPUT_KEYWORDS = ("name", "type", "help", "default", "min", "max", "options")
_BUILTIN_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


class _Undetermined(Exception):
    """The source does something a static reader cannot follow."""


def static_signature(source: str, class_name: str, filename: str = "<model>") -> Signature | None:
    """The signature of ``class_name`` in a model file, read with ``ast`` (never imported):
    a predictor's (based on BasePredictor/BaseRunner, or on nothing), else that of the
    2021 model's ``run()`` (or ``predict()``).

    Returns None when it cannot be determined statically: the class or its method is not
    defined at the top level of the file (e.g. inherited), the method has a decorator other
    than ``@cog.input``, or an argument of ``@cog.input`` is not a literal. Raises
    SignatureError when the declarations are definitely wrong (the same rules, and
    messages, as at import), or when the class surely defines neither method.
    """
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as e:
        raise SignatureError([f"{filename}:{e.lineno}: {e.msg}"]) from None
    except (RecursionError, MemoryError):
        raise SignatureError([f"{filename} nests deeper than the server reads"]) from None
    names = _CogNames.of(tree)
    classes = _top_level_classes(tree)
    cls = classes.get(class_name)
    if cls is None:
        return None
    try:
        if is_predictor_class(tree, cls):
            return static_predictor_signature(tree, cls, filename)
    except RecursionError:  # what parsed may still nest deeper than the reader recurses
        raise SignatureError([f"{filename} nests deeper than the server reads"]) from None
    methods = _methods(cls)
    if not methods and _defines_neither(cls, classes, names, tree):
        raise SignatureError(
            [
                f"{filename}:{cls.lineno}: class {class_name} defines neither run() nor "
                "predict(); define one of them, with its inputs declared by @cog.input"
            ]
        )
    # run() is served when a class has both; a predict() beside an inherited run() is not.
    if "run" in methods:
        method = methods["run"]
    elif "predict" in methods and _bases_are_cog_model(cls, names):
        method = methods["predict"]
    else:
        method = None
    if method is None:
        return None
    try:
        declarations = [names.declaration(d, filename) for d in method.decorator_list]
    except _Undetermined:
        return None
    qualname = f"{class_name}.{method.name}"
    return build_signature(declarations, _static_parameters(method, filename, qualname))


Method = Union[ast.FunctionDef, ast.AsyncFunctionDef]


def _top_level_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    """The classes defined at the top of a module, by name (the last definition wins)."""
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> dict[str, Method | None]:
    """run and predict as the class body defines them: the function, or None when the name
    is bound some other way (``run = ...``), which a static reader cannot follow."""
    found: dict[str, Method | None] = {}
    for node in cls.body:
        for name in METHODS:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found[name] = node
            elif _assigns(node, name):
                found[name] = None
    return found


def _bases_are_cog_model(cls: ast.ClassDef, names: _CogNames) -> bool:
    return bool(cls.bases) and all(names.is_model(base) for base in cls.bases)


def _defines_neither(
    cls: ast.ClassDef,
    classes: dict[str, ast.ClassDef],
    names: _CogNames,
    tree: ast.Module,
    seen: frozenset[str] = frozenset(),
) -> bool:
    """Whether the class surely has neither method: not in its body nor in any base class
    (each cog.Model or a class of this file that has neither), no decorator or metaclass
    that could add one, and no assignment in the module that could (``Model.run = f``)."""
    if cls.name in seen or cls.decorator_list or cls.keywords or not cls.bases:
        return False
    if _methods(cls) or _patched(tree, cls.name):
        return False
    for base in cls.bases:
        if names.is_model(base):
            continue
        if not isinstance(base, ast.Name) or base.id not in classes:
            return False  # from another module: it may define run()
        if not _defines_neither(classes[base.id], classes, names, tree, seen | {cls.name}):
            return False
    return True


def _patched(tree: ast.Module, class_name: str) -> bool:
    """Whether the module sets attributes of the class, or calls setattr on anything."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == class_name
        ):
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
        ):
            return True
    return False


def _assigns(node: ast.stmt, name: str) -> bool:
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def _static_parameters(run: Method, filename: str, qualname: str) -> RunParameters:
    args = run.args
    positional = [a.arg for a in args.posonlyargs] + [a.arg for a in args.args]
    positional_only = [a.arg for a in args.posonlyargs][1:]
    names = positional[1:] + [a.arg for a in args.kwonlyargs]
    # Python reports a decorated function's first line as its first decorator's line.
    line = run.decorator_list[0].lineno if run.decorator_list else run.lineno
    return RunParameters(
        names=tuple(names),
        takes_any=args.kwarg is not None,
        positional_only=tuple(positional_only),
        filename=filename,
        line=line,
        qualname=qualname,
        is_async=isinstance(run, ast.AsyncFunctionDef),
    )


@attrs.frozen
class _CogNames:
    """How a module refers to cog, cog.input and Path types (its imports)."""

    modules: frozenset[str]
    inputs: frozenset[str]
    paths: frozenset[str]
    pathlib_modules: frozenset[str]
    models: frozenset[str]

    @classmethod
    def of(cls, tree: ast.Module) -> _CogNames:
        modules, inputs, paths, pathlib_modules = {"cog"}, set(), {"Path"}, {"pathlib"}
        models: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "cog":
                        modules.add(alias.asname or "cog")
                    elif alias.name == "pathlib":
                        pathlib_modules.add(alias.asname or "pathlib")
            elif isinstance(node, ast.ImportFrom) and node.module in ("cog", "pathlib"):
                for alias in node.names:
                    if node.module == "cog" and alias.name == "input":
                        inputs.add(alias.asname or "input")
                    elif node.module == "cog" and alias.name == "Model":
                        models.add(alias.asname or "Model")
                    elif alias.name in ("Path", "PosixPath", "PurePath"):
                        paths.add(alias.asname or alias.name)
        return cls(
            frozenset(modules),
            frozenset(inputs),
            frozenset(paths),
            frozenset(pathlib_modules),
            frozenset(models),
        )

    def is_model(self, node: ast.expr) -> bool:
        """Whether a base class is cog.Model (``cog.Model``, or ``Model`` imported from cog)."""
        if isinstance(node, ast.Name):
            return node.id in self.models
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "Model"
            and isinstance(node.value, ast.Name)
            and node.value.id in self.modules
        )

    def declaration(self, decorator: ast.expr, filename: str) -> InputDeclaration:
        if not isinstance(decorator, ast.Call) or not self._is_input(decorator.func):
            raise _Undetermined
        call = decorator
        values: dict[str, Any] = {}
        problems: list[str] = []
        if len(call.args) > 2:
            problems.append("@cog.input takes the name and type by position, the rest by keyword")
        for key, node in list(zip(("name", "type"), call.args)) + [
            (k.arg, k.value) for k in call.keywords
        ]:
            if key is None:  # **kwargs
                raise _Undetermined
            if key not in _INPUT_KEYWORDS:
                problems.append(f"@cog.input has no option {key!r}")
                continue
            values[key] = self._type(node) if key == "type" else _literal(node)
        if "type" not in values:
            problems.append("@cog.input needs a type")
        if problems:
            name = values.get("name", "?")
            where = f"{filename}:{call.lineno}"
            raise SignatureError([f"{where}: input {name!r}: {p}" for p in problems])
        return InputDeclaration(line=call.lineno, **values)

    def _is_input(self, func: ast.expr) -> bool:
        if isinstance(func, ast.Name):
            return func.id in self.inputs
        return (
            isinstance(func, ast.Attribute)
            and func.attr == "input"
            and isinstance(func.value, ast.Name)
            and func.value.id in self.modules
        )

    def _type(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            if node.id in _BUILTIN_TYPES:
                return _BUILTIN_TYPES[node.id]
            if node.id in self.paths:
                return pathlib.Path
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = node.value.id
            if node.attr == "Path" and (module in self.modules or module in self.pathlib_modules):
                return pathlib.Path
        elif isinstance(node, ast.Constant):
            return node.value  # a literal is never a type: the rules report it
        raise _Undetermined


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise _Undetermined from None
