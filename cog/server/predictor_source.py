"""A predictor's signature (today's Cog) read from its source with :mod:`ast`, never
imported: the annotations and ``Input(...)`` defaults of ``predict()``/``run()``, and its
return type. The rules are the ones the model's class is checked with at import
(:func:`cog.declarations.build_predictor_signature`), so messages are the same."""

from __future__ import annotations

import ast
from typing import Any

from cog.declarations import MethodDeclaration, ParameterDeclaration, build_predictor_signature
from cog.signature import NO_DEFAULT, OutputType, Signature

#: What names from cog, typing, pathlib and pydantic mean, as this reader calls them.
_COG = {
    "Path": "Path",
    "File": "File",
    "Secret": "Secret",
    "Input": "Input",
    "BasePredictor": "BasePredictor",
    "BaseRunner": "BaseRunner",
    "BaseModel": "BaseModel",
    "ConcatenateIterator": "ConcatenateIterator",
    "AsyncConcatenateIterator": "ConcatenateIterator",
}
_TYPING = {
    "Optional": "Optional",
    "Union": "Union",
    "List": "list",
    "Iterator": "Iterator",
    "AsyncIterator": "Iterator",
    "Generator": "Iterator",
    "AsyncGenerator": "Iterator",
    "Iterable": "Iterator",
    "Any": "Any",
    "Dict": "dict",
}
_MODULES = {
    "cog": _COG,
    "typing": _TYPING,
    "collections.abc": _TYPING,
    "pathlib": {"Path": "Path", "PosixPath": "Path"},
    "pydantic": {"BaseModel": "BaseModel"},
}
_BUILTINS = {"str": "str", "int": "int", "float": "float", "bool": "bool", "list": "list"}
_BUILTINS.update({"dict": "dict", "None": "None"})
_SCALARS = ("str", "int", "float", "bool", "Path", "File", "Secret")


class Undetermined(Exception):
    """The source does something a static reader cannot follow: the image will tell."""


class _Names:
    """What the module's imports make of the names an annotation uses."""

    def __init__(self, tree: ast.Module) -> None:
        self.names: dict[str, str] = dict(_BUILTINS)
        self.modules: dict[str, dict[str, str]] = {}
        self.classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in _MODULES:
                        self.modules[alias.asname or alias.name] = _MODULES[alias.name]
            elif isinstance(node, ast.ImportFrom) and node.module in _MODULES:
                known = _MODULES[node.module]
                for alias in node.names:
                    if alias.name in known:
                        self.names[alias.asname or alias.name] = known[alias.name]

    def resolve(self, node: ast.expr) -> str:
        """A name or attribute as this reader calls it; a local class as ``class:Name``."""
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in self.classes:
                return f"class:{node.id}"
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node.value)
            if dotted in self.modules and node.attr in self.modules[dotted]:
                return self.modules[dotted][node.attr]
        elif isinstance(node, ast.Constant) and node.value is None:
            return "None"
        raise Undetermined


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def is_predictor_class(tree: ast.Module, cls: ast.ClassDef) -> bool:
    """A class of today's Cog: based on BasePredictor/BaseRunner, or on nothing."""
    names = _Names(tree)
    if not cls.bases:
        return True
    for base in cls.bases:
        try:
            if names.resolve(base) in ("BasePredictor", "BaseRunner"):
                return True
        except Undetermined:
            continue
    return False


def static_predictor_signature(
    tree: ast.Module, cls: ast.ClassDef, filename: str
) -> Signature | None:
    """The predictor's signature, None when undetermined; SignatureError when wrong."""
    names = _Names(tree)
    runner = any(_safe(names, b) == "BaseRunner" for b in cls.bases)
    methods = {
        n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    name = "run" if runner or "predict" not in methods else "predict"
    method = methods.get(name)
    if method is None:
        return None  # inherited, or assigned: the image tells
    try:
        return build_predictor_signature(_method(names, method, filename, cls.name))
    except Undetermined:
        return None


def _safe(names: _Names, node: ast.expr) -> str | None:
    try:
        return names.resolve(node)
    except Undetermined:
        return None


def _method(
    names: _Names, method: ast.FunctionDef | ast.AsyncFunctionDef, filename: str, owner: str
) -> MethodDeclaration:
    args = method.args
    other = []
    if args.vararg is not None:
        other.append(f"*{args.vararg.arg}: inputs must be named parameters")
    if args.kwarg is not None:
        other.append(f"*{args.kwarg.arg}: inputs must be named parameters")
    for positional in args.posonlyargs[1:]:
        other.append(f"{positional.arg} is positional-only; inputs are passed by name")
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = [(a, d) for a, d in list(zip(positional, defaults))[1:] if a not in args.posonlyargs]
    pairs += list(zip(args.kwonlyargs, args.kw_defaults))
    parameters = tuple(_parameter(names, arg, default) for arg, default in pairs)
    output: OutputType | None = OutputType("any")
    problem = ""
    if method.returns is not None:
        output, problem = _output(names, _annotation(method.returns))
    return MethodDeclaration(
        parameters=parameters,
        output=output,
        output_problem=problem,
        other_problems=tuple(other),
        filename=filename,
        line=method.decorator_list[0].lineno if method.decorator_list else method.lineno,
        qualname=f"{owner}.{method.name}",
    )


def _annotation(node: ast.expr) -> ast.expr:
    """A string annotation ("Path") parsed as the expression it spells."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            return ast.parse(node.value, mode="eval").body
        except SyntaxError:
            raise Undetermined from None
    return node


def _parameter(names: _Names, arg: ast.arg, default: ast.expr | None) -> ParameterDeclaration:
    options: dict[str, Any] = {}
    value: Any = NO_DEFAULT
    if default is not None:
        call = default if isinstance(default, ast.Call) else None
        if call is not None and _safe(names, call.func) == "Input":
            if len(call.args) > 1 or any(k.arg is None for k in call.keywords):
                raise Undetermined
            if call.args:
                value = _literal(call.args[0])
            for keyword in call.keywords:
                if keyword.arg == "default":
                    value = _literal(keyword.value)
                elif keyword.arg in ParameterDeclaration.__dataclass_fields__:
                    options[keyword.arg] = _literal(keyword.value)
                else:
                    raise Undetermined  # an option this reader does not know
        else:
            value = _literal(default)
    type_, is_list, optional, problem = None, False, False, "has no type annotation"
    if arg.annotation is not None:
        type_, is_list, optional, problem = _input_type(names, _annotation(arg.annotation))
    return ParameterDeclaration(
        name=arg.arg,
        type=type_,
        type_problem=problem,
        is_list=is_list,
        optional=optional,
        default=value,
        line=arg.lineno,
        **options,
    )


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise Undetermined from None


def _subscript(names: _Names, node: ast.expr) -> tuple[str, list[ast.expr]]:
    """``Outer[a, b]`` -> ("Outer" resolved, [a, b]); a plain name has no arguments."""
    if isinstance(node, ast.Subscript):
        inner = node.slice
        items = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        return names.resolve(node.value), items
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return "Union", [node.left, node.right]
    return names.resolve(node), []


def _strip_optional(names: _Names, node: ast.expr) -> tuple[ast.expr, bool]:
    outer, items = _subscript(names, node)
    if outer == "Optional" and len(items) == 1:
        return items[0], True
    if outer == "Union":
        rest = [i for i in items if _safe(names, i) != "None"]
        if len(rest) == 1 and len(items) == 2:
            return rest[0], True
    return node, False


def _input_type(names: _Names, node: ast.expr) -> tuple[str | None, bool, bool, str]:
    inner, optional = _strip_optional(names, node)
    outer, items = _subscript(names, inner)
    is_list = outer == "list"
    if is_list:
        if len(items) != 1:
            raise Undetermined
        outer, items = _subscript(names, items[0])
    if outer in _SCALARS and not items:
        return outer, is_list, optional, ""
    problem = (
        f"{ast.unparse(node)} is not an input type (use str, int, float, bool, cog.Path, "
        "cog.File, cog.Secret, Optional[...] or list[...])"
    )
    return None, False, optional, problem


def _output(names: _Names, node: ast.expr) -> tuple[OutputType | None, str]:
    outer, items = _subscript(names, node)
    if outer in ("Any", "dict", "None"):
        return OutputType("any"), ""
    if outer == "ConcatenateIterator":
        if items and _safe(names, items[0]) != "str":
            return None, "ConcatenateIterator must be of str"
        return OutputType("str", iterator=True, concatenate=True), ""
    if outer in ("Iterator", "list"):
        if not items:
            inner: OutputType | None = OutputType("any")
            problem = ""
        else:
            inner, problem = _output(names, items[0])
        if inner is None:
            return None, problem
        key = "iterator" if outer == "Iterator" else "is_list"
        return OutputType(**{**_fields(inner), key: True}), ""
    if outer in ("Optional", "Union"):
        return None, f"{ast.unparse(node)}: a prediction returns a value (Optional is for fields)"
    if outer in _SCALARS:
        return OutputType(outer), ""
    if outer.startswith("class:"):
        return _object(names, names.classes[outer[len("class:") :]])
    return None, f"{ast.unparse(node)} is not an output type"


def _fields(output: OutputType) -> dict[str, Any]:
    return {k: getattr(output, k) for k in output.__dataclass_fields__}


def _object(names: _Names, cls: ast.ClassDef) -> tuple[OutputType | None, str]:
    if not any(_safe(names, base) == "BaseModel" for base in cls.bases):
        raise Undetermined  # a class of its own making: the image tells
    fields = []
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        if name.startswith("_"):
            continue
        inner, optional = _strip_optional(names, _annotation(node.annotation))
        field, problem = _output(names, inner)
        if field is None or field.iterator or field.type == "object":
            return None, f"{cls.name}.{name}: {problem or 'not a field type'}"
        fields.append((name, OutputType(**{**_fields(field), "optional": optional})))
    return OutputType("object", name=cls.name, fields=tuple(fields)), ""
