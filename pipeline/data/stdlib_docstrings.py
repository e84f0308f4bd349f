"""A real instruction dataset that needs no network: the CPython standard library's own docstrings.

Each example is a chat: the user gives a function's source with its docstring removed and asks for
the docstring; the assistant answers with the docstring the function really has. The docstrings are
human-written and PSF-licensed, and they ship with every interpreter. One JSON-lines file per
top-level module (`<module>.jsonl`), so `data.split.rule: path_hash` holds whole modules out.

`data.path: builtin:stdlib-docstrings` builds it once under `data.cache_dir/datasets/` (pipeline.data.builtin).
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import textwrap
from pathlib import Path

NAME = "stdlib-docstrings"
FORMAT_VERSION = 1  # bump when the examples change, so a kept copy is rebuilt
SKIPPED_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "_bundled", "turtledemo"}
MIN_DOCSTRING_CHARS, MAX_DOCSTRING_CHARS = 40, 1200
MAX_CODE_LINES = 40  # longer functions make prompts longer than a small model's blocks


def version() -> str:
    """The built copy's version: this interpreter's standard library and the examples' format."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}-v{FORMAT_VERSION}"


def records_by_file() -> dict[str, list[dict]]:
    return examples_by_module(Path(sysconfig.get_paths()["stdlib"]))


def examples_by_module(stdlib: Path) -> dict[str, list[dict]]:
    """module -> its examples, modules and functions in a fixed order."""
    by_module: dict[str, list[dict]] = {}
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        records = [_record(module, name, code, doc) for name, code, doc in functions(path)]
        if records:
            by_module.setdefault(module.split(".")[0], []).extend(records)
    return by_module


def functions(path: Path):
    """(qualified name, source without its docstring, docstring) for each documented function."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found = _without_docstring(child, lines)
                if found:
                    yield f"{prefix}{child.name}", *found

    yield from visit(tree, "")


def _without_docstring(function, lines: list[str]) -> tuple[str, str] | None:
    doc = ast.get_docstring(function, clean=True)
    if not doc or not MIN_DOCSTRING_CHARS <= len(doc) <= MAX_DOCSTRING_CHARS or len(function.body) < 2:
        return None
    first = function.decorator_list[0].lineno if function.decorator_list else function.lineno
    docstring = function.body[0]
    kept = lines[first - 1:docstring.lineno - 1] + lines[docstring.end_lineno:function.end_lineno]
    if len(kept) > MAX_CODE_LINES:
        return None
    return textwrap.dedent("\n".join(kept)), doc


def _record(module: str, name: str, code: str, doc: str) -> dict:
    prompt = f"Write the docstring of `{name}` from the Python standard library module `{module}`:\n\n{code}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": doc}],
            "module": module, "function": name}
