"""Safe YAML reading and generic, typed validation of configuration dataclasses.

Every configuration section of simlab is a frozen dataclass whose fields carry type hints and
optional numeric constraints in ``field(metadata={"ge": .., "gt": .., "le": .., "lt": .., "help": ..})``;
an upper bound states its reason in ``"why"`` (it is part of the error). A float is always finite
(``.inf`` and ``.nan`` are refused: no setting means "unbounded" by infinity).
:func:`build` turns a plain mapping (parsed YAML) into such a dataclass and reports *every* problem
as a :class:`ScenarioError` naming the file, the dotted key path, what was expected and what was
found. Unknown keys are errors. Cross-field rules live in an optional ``check()`` method of a
dataclass that returns ``(field, message)`` pairs. A text field may name values that were renamed,
``metadata={"renamed": {old: what to write instead}}``: an old value is an error that says so.

YAML is parsed with a ``SafeLoader`` subclass: no object-constructing tags, a size limit on the file,
and a limit on the *expanded* size of the document, so alias bombs ("billion laughs") are refused
before anything walks them. A key written twice in one mapping is an error naming both lines (PyYAML
would keep the last silently). Numbers with an exponent and no dot (``1e-3``) are floats, as in YAML 1.2
and on the command line (YAML 1.1 reads them as text). Mappings and lists nest at most
``MAX_DEPTH`` levels (deeper documents would exhaust Python's recursion limit), and an integer has at
most ``MAX_INT_DIGITS`` digits.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import sys
import types
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

MAX_FILE_BYTES = 1_000_000
MAX_EXPANDED_NODES = 200_000
MAX_DEPTH = 100
"""Nesting levels of mappings and lists in one document; a scenario needs fewer than ten."""
MAX_INT_DIGITS = 100
"""Digits of one integer in a document: more than any bound in the schema, far fewer than Python's
int-to-text limit (4300), past which even printing the number fails."""


class ScenarioError(ValueError):
    """One or more problems in a scenario file; ``problems`` holds (key_path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {path or '<top>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------- YAML
class _BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested too deeply, integers too long, and documents whose
    alias-expanded size is too large."""

    _depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep; refused", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits; at most {MAX_INT_DIGITS} are read", node.start_mark)
        return super().construct_yaml_int(node)

    def compose_document(self):  # type: ignore[override]
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        """A key written twice in one mapping is an error (PyYAML keeps the last silently)."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads a float only with a dot, so ``lr: 1e-3`` would be the text "1e-3" while
# ``--set federation.lr=1e-3`` is a number; the YAML 1.2 float rule (exponent without a dot) is added
# to this loader only.
_BoundedSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_BoundedSafeLoader.add_constructor("tag:yaml.org,2002:int", _BoundedSafeLoader.construct_yaml_int)


def _check_expanded_size(root: yaml.Node) -> None:
    memo: dict[int, int] = {}
    on_stack: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in on_stack:
            raise yaml.YAMLError("recursive alias in YAML document")
        on_stack.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_EXPANDED_NODES:
                    break
        on_stack.discard(key)
        memo[key] = total
        if total > MAX_EXPANDED_NODES:
            raise yaml.YAMLError(
                f"document expands to more than {MAX_EXPANDED_NODES} nodes (alias expansion?); refused"
            )
        return total

    if root is not None:
        size(root)


def read_yaml(path: str | Path) -> Any:
    """Parse one YAML file safely; errors name the file (and line where YAML gives one)."""
    p = Path(path)
    src = str(path)
    if not p.is_file():
        raise ScenarioError(src, [("", "file not found")])
    raw = p.read_bytes()
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError(src, [("", f"file is {len(raw)} bytes; scenarios are limited to {MAX_FILE_BYTES}")])
    return parse_yaml(raw.decode("utf-8", errors="replace"), src)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_BoundedSafeLoader)  # noqa: S506 - bounded SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(source, [("", f"invalid YAML: {where}{problem}")]) from None


# ---------------------------------------------------------------------------------- building
def _shown(value: Any) -> str:
    """``repr``, except for an integer too long to read in a message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return _shown(value)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        if origin is dict:
            return f"a mapping of {_type_name(args[1])}"
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Builder:
    def __init__(self, source: str):
        self.source = source
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: str, msg: str) -> None:
        self.problems.append((path, msg))

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        origin = get_origin(tp)
        if tp is Any:
            return raw
        if origin in (Union, types.UnionType):
            return self._union(tp, raw, path)
        if origin is Literal:
            if raw not in get_args(tp) or isinstance(raw, bool) != any(isinstance(a, bool) for a in get_args(tp)):
                self.fail(path, f"expected {_type_name(tp)}, found {_describe(raw)}")
            return raw
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, raw, path)
        if origin in (list, tuple, dict):
            return self._container(tp, origin, raw, path)
        return self._scalar(tp, raw, path)

    def _union(self, tp: Any, raw: Any, path: str) -> Any:
        args = get_args(tp)
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return self.value(inner[0], raw, path)
        for a in inner:  # first alternative that accepts without problems
            trial = _Builder(self.source)
            out = trial.value(a, raw, path)
            if not trial.problems:
                return out
        self.fail(path, f"expected {_type_name(tp)}, found {_describe(raw)}")
        return None

    def _container(self, tp: Any, origin: Any, raw: Any, path: str) -> Any:
        args = get_args(tp)
        if not isinstance(raw, dict if origin is dict else list):
            self.fail(path, f"expected {_type_name(tp)}, found {_describe(raw)}")
            return {} if origin is dict else ([] if origin is list else None)
        if origin is list:
            return [self.value(args[0], v, f"{path}[{i}]") for i, v in enumerate(raw)]
        if origin is tuple:
            if args and args[-1] is Ellipsis:
                return tuple(self.value(args[0], v, f"{path}[{i}]") for i, v in enumerate(raw))
            if len(raw) != len(args):
                self.fail(path, f"expected {_type_name(tp)}, found a list of {len(raw)}")
                return None
            return tuple(self.value(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, raw)))
        out = {}
        for k, v in raw.items():
            if not isinstance(k, str):
                self.fail(f"{path}.{k}", f"expected a text key, found {_describe(k)}")
                continue
            out[k] = self.value(args[1], v, f"{path}.{k}")
        return out

    def _scalar(self, tp: Any, raw: Any, path: str) -> Any:
        if tp is bool:
            if not isinstance(raw, bool):
                self.fail(path, f"expected true or false, found {_describe(raw)}")
            return raw
        if tp is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.fail(path, f"expected an integer, found {_describe(raw)}")
            return raw
        if tp is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                self.fail(path, f"expected a number, found {_describe(raw)}")
                return raw
            try:
                number = float(raw)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                self.fail(path, f"expected a finite number, found {_describe(raw)}")
            return number
        if tp is str:
            if not isinstance(raw, str):
                self.fail(path, f"expected text, found {_describe(raw)}")
            return raw
        raise TypeError(f"unsupported configuration type {tp!r} at {path}")

    def dataclass(self, cls: type, raw: Any, path: str) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, found {_describe(raw)}")
            return None
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        prefix = f"{path}." if path else ""
        for key in raw:
            if key not in fields:
                known = ", ".join(sorted(fields))
                self.fail(f"{prefix}{key}", f"unknown key (known keys here: {known})")
        kwargs = {}
        before = len(self.problems)
        for name, f in fields.items():
            if name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.fail(f"{prefix}{name}", f"missing required key (expected {_type_name(hints[name])})")
                continue
            renamed = f.metadata.get("renamed", {})
            if isinstance(raw[name], str) and raw[name] in renamed:
                self.fail(f"{prefix}{name}", f"{raw[name]!r} {renamed[raw[name]]}")
                continue
            typed = len(self.problems)
            value = self.value(hints[name], raw[name], f"{prefix}{name}")
            if len(self.problems) == typed:  # bounds only for a value of the right type
                self._bounds(f, value, f"{prefix}{name}")
            kwargs[name] = value
        if len(self.problems) > before:
            return None
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            self.fail(path, str(exc))
            return None
        check = getattr(obj, "check", None)
        if callable(check):
            for field_name, msg in check():
                self.fail(f"{prefix}{field_name}" if field_name else path, msg)
        return obj

    def _bounds(self, f: dataclasses.Field, value: Any, path: str) -> None:
        meta = f.metadata
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
                continue  # not a number, or reported as not finite
            for key, op, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"),
                                  ("le", operator.le, "<="), ("lt", operator.lt, "<")):
                if key in meta and not op(v, meta[key]):  # exact for integers of any size
                    why = f" ({meta['why']})" if key in ("le", "lt") and "why" in meta else ""
                    self.fail(path, f"expected a value {word} {meta[key]}{why}, found {_shown(v)}")
                    return


def build(cls: type, raw: Any, source: str) -> Any:
    """Build dataclass ``cls`` from ``raw``; raise ScenarioError listing every problem."""
    builder = _Builder(source)
    obj = builder.dataclass(cls, raw, "")
    if builder.problems:
        raise ScenarioError(source, builder.problems)
    return obj


def to_plain(obj: Any) -> Any:
    """Dataclass tree → plain dicts/lists (tuples become lists), for YAML/JSON output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    """Apply ``a.b.c=value`` to a raw mapping (before validation). Lists are indexed by integers."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ScenarioError(source, [(where, f"--set: no list element {part!r} here")])
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ScenarioError(source, [(where, "--set: cannot descend into a non-mapping value")])
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]



def assemble(name: str, doc: str, fields: list[tuple], plugins: Mapping[str, type], namespace: dict | None = None) -> type:
    """A frozen configuration dataclass made of ``fields`` plus one section per plug-in that declares
    ``Params``: field ``<plug-in name>`` of type ``Params`` with its defaults. This is how a registry
    (methods, aggregation rules) contributes its plug-ins' parameters to the scenario schema without
    the schema naming them: a new plug-in's section appears when it is registered."""
    sections = [(key, cls.Params, dataclasses.field(
                    default_factory=cls.Params, metadata={"help": f"parameters of {key}: {getattr(cls, 'help', '')}"}))
                for key, cls in plugins.items() if getattr(cls, "Params", None) is not None]
    cls = dataclasses.make_dataclass(name, [*fields, *sections], frozen=True, namespace=namespace or {})
    cls.__doc__ = doc
    cls.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)  # where it is defined, for pickle
    return cls
