"""The one config loader of every command: a dataclass's fields filled from ``--config file.yaml|json``, then
flags, then trailing ``key=value`` overrides (dataclass defaults < config file < flags < overrides), each value
converted to its field's declared type. Used by ``training.config.load_config`` (the training job),
``data_preprocess.preprocess`` (:func:`build`), ``data_preprocess.audio`` and ``inference.audio``
(:func:`from_namespace`), ``benchmarks.common.parse_config`` (every benchmark) and ``inference.cli_config``
(the config file of predict / demo).

A value that cannot be used raises :class:`ConfigError` (one line: where, the key, the reason, the fix);
data_preprocess is the lowest layer, so the error type lives here.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path

from data_preprocess.hub import ArgumentError


class ConfigError(ArgumentError):
    """A refused config value or job: ``str(e)`` is one line with the file / flag / key, the reason and the fix.
    A CLI prints it as ``error: <line>`` (``data_preprocess.hub.exit_on_argument_error``)."""


def _hint(cls, name: str):
    """The declared type of field ``name``, with ``X | None`` read as ``(X, True)``."""
    t = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    optional = typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) < len(typing.get_args(t))
    return (args[0] if optional else t), optional


def field_types(cls) -> dict[str, type]:
    """``{field name: type}`` of dataclass ``cls``, with ``X | None`` (and ``Optional[X]``) read as ``X``."""
    return {f.name: _hint(cls, f.name)[0] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """``{field name: its docstring}`` of dataclass ``cls`` (and its bases): the string literal right under a
    field, the one place a field is documented -- ``--help`` and docs/reference.md both show it."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_bool(v) -> bool:
    """``v`` as a bool: a bool as is, else true/false, yes/no, y/n, on/off, 1/0 (any case); a ValueError otherwise."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def suggest(cls, name: str, aliases: dict[str, str] | None = None) -> list[str]:
    """Keys a mistyped ``name`` probably meant: an alias (another tool's name for a field), close spellings,
    then fields sharing its first word."""
    names = [f.name for f in dataclasses.fields(cls)]
    alias = [aliases[name]] if aliases and name in aliases else []
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    prefix = [k for k in names if k.split("_")[0] == name.split("_")[0]]
    return list(dict.fromkeys(alias + close + prefix))[:6] or sorted(names)[:8]


def convert(cls, name: str, value, where: str, aliases: dict[str, str] | None = None):
    """``value`` (from YAML/JSON or a command line string) as the declared type of field ``name`` of ``cls``:
    ``lr=1e-4`` a float, ``max_steps=1e3`` an int, ``a,b`` or a YAML list a ``list[str]`` / ``list[float]``,
    ``none`` / ``null`` None where the field allows it; a :class:`ConfigError` when it cannot."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        raise ConfigError(f"{where}: unknown config key '{name}'. Fix: use one of {suggest(cls, name, aliases)}")
    hint, optional = _hint(cls, name)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [] if value.strip() in ("", "[]", "none") else [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [float(v) for v in value] if args and args[0] is float else [str(v) for v in value]
        if hint is bool:
            return parse_bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            if isinstance(value, str) and "e" in value.lower():
                f = float(value)
                if not f.is_integer():
                    raise ValueError(f"not an integer: {value!r}")
                return int(f)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
        return value
    except (TypeError, ValueError) as e:
        tname = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{where}: {name}={value!r}: {e}. Fix: give a value of type {tname}") from None


def load_file(path: str) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON config file as a mapping; a :class:`ConfigError` naming the file (and
    the line) when it is missing, malformed or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found. Fix: pass an existing YAML/JSON file (see configs/)")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: cannot parse ({e.msg}). Fix: correct the JSON syntax") from None
    else:
        import yaml  # (optional dependency of the JSON-only paths; installed with tunesmith)

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"{p}:{mark.line + 1 if mark else '?'}: cannot parse ({getattr(e, 'problem', e)}). "
                              "Fix: correct the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys. Fix: write `key: value` lines")
    return data


def collect(cls, cfg_file: str | None, flags: dict, overrides: list[str] | tuple,
            flag_where=lambda name: "command line", aliases: dict[str, str] | None = None) -> dict:
    """The values of ``cls``'s fields from a config file, then flags, then ``key=value`` overrides (a later source
    wins), each converted to its field's type (:func:`convert`); ``flag_where(name)`` names a flag in an error."""
    values: dict = {}
    if cfg_file:
        for k, v in load_file(cfg_file).items():
            values[k] = convert(cls, k, v, cfg_file, aliases)
    for k, v in flags.items():
        values[k] = convert(cls, k, v, flag_where(k), aliases)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value. Fix: e.g. lr=1e-4 train_type=lora")
        k, v = item.split("=", 1)
        values[k.strip()] = convert(cls, k.strip(), v, f"override '{item}'", aliases)
    return values


def from_namespace(cls, ns: argparse.Namespace):
    """A ``cls`` instance from parsed arguments: their ``config`` (a file), the flags given (dests equal to field
    names, ``default=argparse.SUPPRESS`` so a flag not given keeps the file's value) and ``overrides``
    (``key=value``). Unknown keys are a :class:`ConfigError` naming the keys meant."""
    args = dict(vars(ns))
    cfg_file = args.pop("config", None)
    overrides = args.pop("overrides", None) or []
    values = collect(cls, cfg_file, args, overrides, flag_where=lambda k: f"--{k}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"config: {e}") from None


def document(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """Sets the ``--help`` text of every option of ``parser`` whose dest is a field of ``cls`` to that field's
    docstring and default (:func:`field_docs`: the one place an option is described); returns ``parser``."""
    docs, defaults = field_docs(cls), {f.name: f for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.dest in docs:
            f = defaults[action.dest]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            shown = "" if default in (None, "") else f" (default: {default})"
            action.help = (docs[action.dest] + shown).replace("%", "%%")
    return parser


def build(cls, parser: argparse.ArgumentParser, argv=None):
    """Parses ``argv`` with ``parser`` (options with ``default=argparse.SUPPRESS`` and dests equal to field names,
    plus ``--config`` and an ``overrides`` positional; their help is the fields' docstrings, :func:`document`)
    into a ``cls`` instance (:func:`from_namespace`)."""
    return from_namespace(cls, document(parser, cls).parse_args(argv))
