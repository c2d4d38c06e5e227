"""Typed job configs for the data tools: a dataclass + argparse flags + ``--config file.yaml|json`` +
trailing ``key=value`` overrides. Precedence: dataclass defaults < config file < flags < overrides.

The file/field helpers here are also used by benchmarks/ and inference/ (data_preprocess is the lowest layer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path


def field_types(cls) -> dict[str, type]:
    """``{field name: type}`` of dataclass ``cls``, with ``X | None`` (and ``Optional[X]``) read as ``X``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args and typing.get_origin(t) in (typing.Union, types.UnionType) else t
    return out


def parse_bool(v) -> bool:
    """``v`` as a bool: a bool as is, else true/false, yes/no, y/n, on/off, 1/0 (any case); a ValueError otherwise."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true/false, got {v!r}")


def convert(cls, name: str, value, where: str):
    """Converts ``value`` to the type of field ``name`` of ``cls``; a clear SystemExit when it cannot."""
    types_ = field_types(cls)
    if name not in types_:
        raise SystemExit(f"{where}: unknown option '{name}'; valid: {', '.join(sorted(types_))}")
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and types_[name] is not str):
        return None
    t = types_[name]
    try:
        return parse_bool(value) if t is bool else t(value)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{where}: option '{name}' expects {t.__name__}, got {value!r} ({e})") from None


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise SystemExit(f"{p}:{mark.line + 1 if mark else '?'}: invalid YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{p}: a config file must hold a mapping of option: value")
    return data


def collect(cls, cfg_file: str | None, flags: dict, overrides: list[str], flag_where=lambda name: "command line") -> dict:
    """The values of ``cls``'s fields from a config file, then flags, then ``key=value`` overrides (a later source
    wins), each converted to its field's type (:func:`convert`); ``flag_where(name)`` names a flag in an error.
    The one merge behind :func:`build` and ``benchmarks.common.parse_config``."""
    values: dict = {}
    if cfg_file:
        for k, v in load_file(cfg_file).items():
            values[k] = convert(cls, k, v, cfg_file)
    for k, v in flags.items():
        values[k] = convert(cls, k, v, flag_where(k))
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        values[k.strip()] = convert(cls, k.strip(), v, f"override {item!r}")
    return values


def build(cls, parser: argparse.ArgumentParser, argv=None):
    """Parses ``argv`` with ``parser`` (whose options must use ``default=argparse.SUPPRESS`` and dests
    equal to field names, plus ``--config`` and a ``overrides`` positional) into a ``cls`` instance."""
    ns = vars(parser.parse_args(argv))
    cfg_file = ns.pop("config", None)
    overrides = ns.pop("overrides", []) or []
    values = collect(cls, cfg_file, ns, overrides)
    try:
        return cls(**values)
    except TypeError as e:
        raise SystemExit(f"config: {e}") from None
