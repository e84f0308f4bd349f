"""The configuration as a plain mapping, before it is validated: YAML files with `extends:`, one
mapping overlaid on another, dotted `section.field=value` overrides, and the flat `a.b` view that
becomes MLflow params. Knows nothing of the schema (`pipeline.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (names the field)."""


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config mapping; `extends: other.yaml` (relative to this file) is read first and overlaid."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"extends: {path} extends itself through {base_path}")
    return overlay(read_yaml(base_path, (*seen, path.resolve())), raw)


def overlay(base: dict, top: dict) -> dict:
    """`top` over `base`, recursively (a YAML over the one it extends, train.deepspeed over the generated config)."""
    merged = _deep_copy(base)
    for key, value in top.items():
        merged[key] = overlay(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else _deep_copy(value)
    return merged


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys (`train.lr=3e-4`); values are parsed as YAML, so numbers and lists work."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' must look like section.field=value")
        node = result
        *parents, leaf = key.split(".")
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:  # an optional section left out (model.lora): setting a field switches it on
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parents[: index + 1])}: is a value, cannot set '{key}'")
            node = child
        node[leaf] = yaml.safe_load(value) if value else ""
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: how the config becomes MLflow params."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in value.items():
        flat.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return flat
