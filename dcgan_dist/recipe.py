"""Recipes: a YAML file + `section.key=value` overrides -> a validated `config.Config` (`load_config`), and the
config written back as YAML (`save_config`, run_dir/config.yaml). Unknown keys and wrong types raise `UserError`
naming the key, the value and what is accepted. No file is read but the YAML; no torch at import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dcgan_dist.config import Config, validate
from dcgan_dist.errors import UserError


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Recipe file (or the defaults) + `a.b=value` overrides -> validated Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=200)")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _OverrideText(text)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} not found; pass an existing recipe, e.g. --config configs/mnist5k.yaml")
    try:
        raw = yaml.safe_load(p.read_text())  # safe_load: a config never constructs Python objects
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise UserError(f"config file {path}{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (run, data, model, ...)")
    return raw


class _OverrideText(str):
    """A value from the command line: parsed as YAML, then coerced to the field's type."""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + str(unknown[0])
        raise UserError(f"unknown config key {key}; accepted keys here: {', '.join(sorted(names))}")
    values = {}
    for name in raw:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], hint, prefix + name)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a value against a field type (str, int, float, bool, or X | None)."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if isinstance(value, _OverrideText):
        if hint is str:
            return str(value)
        try:
            value = yaml.safe_load(str(value))
        except yaml.YAMLError:
            raise UserError(f"{key}={value!s}: cannot parse the value; expected {hint.__name__}") from None
    if value is None and optional:
        return None
    if typing.get_origin(hint) is list:  # list[str]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{key} = {value!r} has the wrong type; expected a list of strings, e.g. [a, b]")
        return list(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (hint is str and isinstance(value, str))
    )
    if not ok:
        kind = hint.__name__ + (" or null" if optional else "")
        raise UserError(f"{key} = {value!r} has the wrong type; expected {kind}")
    return float(value) if hint is float else value


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
