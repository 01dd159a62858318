"""Configs are data: dataclasses built from YAML presets plus ``key=value`` overrides (the command line's form).

An unknown key anywhere is an error that names the key and lists the valid ones, so a typo in a
preset or on the command line never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from .atomic import write_atomic

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

T = TypeVar("T")


def presets(package: str, *parts: str) -> Traversable:
    """The preset folder shipped inside ``package`` (package data, so an installed wheel has it too)."""
    return importlib.resources.files(package).joinpath("presets", *parts)


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses; unknown keys raise."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{name} must be a mapping, got {value!r}")
            value = from_dict(hint, value, f"{where}{name}.")
        else:
            value = _coerce(value, hint, where + name)
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a leaf value against its annotation (ints accepted for floats, tuples from lists)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"config key {key} = {value!r} does not match {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key} must be a list, got {value!r}")
        return list(value) if origin is list else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ValueError(f"config key {key} must be {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    """A config as plain nested dicts (what YAML, trackers and exports store)."""
    return dataclasses.asdict(cfg)


def with_overrides(cfg: T, overrides: list[str]) -> T:
    """``cfg`` with the user's ``key=value`` overrides applied on top, validated like a preset's."""
    if not overrides:
        return cfg
    return from_dict(type(cfg), apply_overrides(to_dict(cfg), list(overrides)))


def preset_names(directory: Traversable) -> list[str]:
    """The preset names shipped in ``directory``."""
    return sorted(p.name[:-5] for p in directory.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str, directory: Traversable) -> Traversable:
    """A preset name under ``directory`` or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"preset file {name} does not exist")
        return path
    candidate = directory.joinpath(f"{name}.yaml")
    if not candidate.is_file():
        known = ", ".join(preset_names(directory)) or f"none (the package data folder {directory} is missing)"
        raise ValueError(f"unknown preset {name!r}; known presets: {known} (or pass a .yaml path)")
    return candidate


def load_yaml(path: Traversable) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping at top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` entries (values parsed as YAML) on a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], preset: str, overrides: list[str] | None, directory: Traversable) -> T:
    """Preset YAML (which may name a ``base`` preset it extends) + overrides -> validated dataclass."""
    data = _resolve(preset_path(preset, directory), set(), directory)
    return from_dict(cls, apply_overrides(data, overrides or []))


def _resolve(path: Traversable, seen: set, directory: Traversable) -> dict:
    if path in seen:
        raise ValueError(f"preset {path} extends itself")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_resolve(preset_path(base, directory), seen | {path}, directory), data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML beside the run it configures."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
