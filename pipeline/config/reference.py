"""The config reference, generated from the typed config: the README's table and the CLI's help.

The typed config is the interface: a field's meaning is the string under it (its pydantic
description), a section's is its class docstring, and defaults, choices and bounds come from the
fields themselves. Nothing here is written by hand, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import Config
from pipeline.raw_config import ConfigError

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
WRITE_COMMAND = "pipeline config-reference --write README.md"
_NOTE = f"<!-- generated from the field docstrings in pipeline/config/ by `{WRITE_COMMAND}`: edit those, not this table -->"
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))  # attributes of the annotated_types pydantic keeps


@dataclass(frozen=True)
class Row:
    path: str  # dotted, as an override names it: train.zero.offload_optimizer
    default: str  # already markdown
    meaning: str


def doc(text: str | None) -> str:
    """A docstring or description as one line of prose."""
    return " ".join(inspect.cleandoc(text or "").split())


def _members(annotation) -> tuple:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)


def _section(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the section's model, whether it is optional) for a field holding a section, else (None, False)."""
    members = _members(annotation)
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) == 1 and len(members) <= 2:
        return models[0], type(None) in members
    return None, False


def _dict_entry(annotation) -> type[BaseModel] | None:
    """The model of a dict-of-sections field's values (sweep.space), else None."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


def _yamlish(value) -> str:
    """A value as one would write it in the YAML file."""
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # a double-quoted YAML scalar, escapes shown, on one line
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True).strip()
    return text.removesuffix("...").strip()  # a bare scalar is dumped as a document with an end marker


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "(required)"
    if info.default is None:
        return "none"
    return f"`{_yamlish(info.default)}`"


def _allowed(info: FieldInfo) -> str:
    """The choices of a Literal field and the bounds of a number, as a sentence (or nothing)."""
    members = [m for m in _members(info.annotation) if m is not type(None)]
    parts = []
    if members and all(typing.get_origin(m) is typing.Literal for m in members):
        choices = [f"`{_yamlish(choice)}`" for m in members for choice in typing.get_args(m)]
        # Choices the description already names one by one are not listed again.
        if not all(choice in (info.description or "") for choice in choices):
            parts += choices
    for item in info.metadata:
        for name, sign in _BOUNDS:
            if getattr(item, name, None) is not None:
                parts.append(f"{sign} {_yamlish(getattr(item, name))}")
    return f" Allowed: {', '.join(parts)}." if parts else ""


def _meaning(info: FieldInfo) -> str:
    return doc(info.description) + _allowed(info)


def _entry_shape(model: type[BaseModel]) -> str:
    names = ", ".join(model.model_fields)
    lines = [f"{doc(model.__doc__)} Each entry, `PATH: {{{names}}}`:"]
    lines += [f"`{name}` ({'required' if info.is_required() else _default(info)}): {_meaning(info)}"
              for name, info in model.model_fields.items()]
    return "<br>".join(lines)


def rows(model: type[BaseModel] = Config, prefix: str = "") -> list[Row]:
    """Every field below `model`, depth first in declaration order; a section is a row, then its fields."""
    found = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section, optional = _section(info.annotation)
        entry = _dict_entry(info.annotation)
        if section is not None:
            default = "none" if optional else ("(required)" if info.is_required() else "")
            found.append(Row(path, default, doc(section.__doc__)))
            found += rows(section, path + ".")
        elif entry is not None:
            found.append(Row(path, _default(info), f"{_meaning(info)}<br>{_entry_shape(entry)}"))
        else:
            found.append(Row(path, _default(info), _meaning(info)))
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe would end the cell, even inside backticks


def table(section: str | None = None) -> str:
    """The markdown table of every field, or of one section's (`train`, `train.zero`)."""
    selected = [row for row in rows() if section is None or row.path == section or row.path.startswith(section + ".")]
    if not selected:
        raise ConfigError(f"config-reference: no section '{section}'; the sections are {', '.join(Config.model_fields)}")
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{row.path}` | {_cell(row.default)} | {_cell(row.meaning)} |" for row in selected]
    return "\n".join(lines)


def block() -> str:
    """The README's generated block, markers included."""
    return f"{START}\n{_NOTE}\n\n{table()}\n{END}"


def _split(text: str, path: Path) -> tuple[str, str, str]:
    """(before, the block, after) of a file holding the markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"{path}: no config reference block ({START} ... {END})")
    end += len(END)
    return text[:start], text[start:end], text[end:]


def check(path: Path) -> str | None:
    """What is wrong with the file's block (out of date, missing), or None when it is current."""
    _, current, _ = _split(path.read_text(), path)
    if current != block():
        return f"README config reference is out of date: run `{WRITE_COMMAND}`"
    return None


def write(path: Path) -> bool:
    """Rewrite the file's block; False when it was current already."""
    before, current, after = _split(path.read_text(), path)
    if current == block():
        return False
    path.write_text(before + block() + after)
    return True


def epilog() -> str:
    """The top-level sections with their one-line summaries, for `--help` of the commands taking a config."""
    width = max(len(name) for name in Config.model_fields) + 4
    lines = ["config sections (override any field with SECTION.FIELD=VALUE):"]
    for name, info in Config.model_fields.items():
        section, _ = _section(info.annotation)
        summary = doc(section.__doc__).split(". ")[0].rstrip(".")
        lines += textwrap.wrap(summary, 100, initial_indent=f"  {name:<{width - 2}}", subsequent_indent=" " * width)
    lines.append("every field, its default and meaning: pipeline config-reference [SECTION], e.g. "
                 "pipeline config-reference train.zero")
    return "\n".join(lines)
