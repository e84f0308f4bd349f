"""Built-in datasets: real corpora that need no network, addressed as `data.path: builtin:<name>`.

Each is built once, from files every machine of this project has, into
`data.cache_dir/datasets/<name>-<version>/` as JSON-lines files, one per unit the split should keep
whole (a module, a speech), so `data.split.rule: path_hash` holds whole units out. The directory's
`_COMPLETE` marker is written last: a build that died is redone.

- `stdlib-docstrings` (pipeline.data.stdlib_docstrings): chats asking for a standard-library
  function's docstring, for `data.format: chat`;
- `sotu-passages` (pipeline.data.sotu_passages): State of the Union passages labelled by how the
  speech was delivered, for `data.format: labelled_text`.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.data import sotu_passages, stdlib_docstrings

BUILTIN_PREFIX = "builtin:"
DATASETS = {module.NAME: module for module in (stdlib_docstrings, sotu_passages)}
COMPLETE = "_COMPLETE"


def builtin_path(path: str, cache_dir: str) -> str:
    """`builtin:<name>` -> the directory of its files (built once); other paths unchanged."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    dataset = DATASETS.get(name)
    if dataset is None:
        raise ConfigError(f"data.path: unknown built-in dataset '{name}' (there are: {', '.join(DATASETS)})")
    location = storage.join(cache_dir, "datasets", f"{name}-{dataset.version()}")
    done = storage.join(location, COMPLETE)
    if not storage.is_file(done):
        for stem, records in dataset.records_by_file().items():
            storage.write_text(storage.join(location, f"{stem}.jsonl"),
                               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        storage.write_text(done, "")  # last: a build that died is redone
    return location  # its marker file is empty: no records
