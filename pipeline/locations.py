"""Where the config points: `package:NAME/...` paths, file globs, one root for every location, and
relative paths anchored where a Ray job can still find them.

Kept apart from `pipeline.config` (the schema and its loading) so that each stays one read.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

from pipeline.config import Config, ConfigError, is_uri

PACKAGE_PREFIX = "package:"


def location_overrides(root: str | os.PathLike) -> list[str]:
    """Overrides that keep every cache, output and tracking store under one directory
    (tests, benchmarks, throw-away experiments)."""
    root = Path(root)
    return [f"model.cache_dir={root / 'models'}", f"data.cache_dir={root / 'data'}",
            f"train.output_dir={root / 'outputs'}", f"sweep.storage_dir={root / 'sweeps'}",
            f"tracking.uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}"]


def resolve_path(path: str) -> str:
    """Expand `package:NAME/rel` to a path inside an installed package (found without importing it,
    since some asset packages fail or are slow to import), and `~`. Globs are kept as they are."""
    if path.startswith(PACKAGE_PREFIX):
        package, _, rel = path[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{path}: Python package '{package}' is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / rel)
    return os.path.expanduser(path)


def expand_files(path: str, field: str) -> list[Path]:
    """A file, a directory (all files below it) or a glob -> sorted list of files. Errors name `field`."""
    resolved = resolve_path(path)
    if any(ch in resolved for ch in "*?["):
        files = [Path(p) for p in glob.glob(resolved, recursive=True)]
    elif Path(resolved).is_dir():
        files = [p for p in Path(resolved).rglob("*") if not p.name.startswith(".")]
    else:
        files = [Path(resolved)] if Path(resolved).exists() else []
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise ConfigError(f"{field}: no files match '{path}'")
    return files


def anchor_paths(cfg: Config, inputs_base: Path, work_dir: Path | None = None) -> Config:
    """Relative paths made absolute: inputs against `inputs_base` (where the command started), caches,
    outputs and the default tracking store against `work_dir` (default: the same).

    Why: inside a Ray job the working directory is a temporary copy of the repo, which Ray may delete
    once it starts (seen with two nodes on one host), and whose contents other nodes never see. Jobs
    therefore set PIPELINE_WORK_DIR to storage every node shares; relative paths resolved late fail.
    """
    work_dir = work_dir or inputs_base
    outputs = {"model.cache_dir": cfg.model.cache_dir, "data.cache_dir": cfg.data.cache_dir,
               "train.output_dir": cfg.train.output_dir, "sweep.storage_dir": cfg.sweep.storage_dir}
    inputs = {"data.path": cfg.data.path, "model.tokenizer_corpus": cfg.model.tokenizer_corpus,
              "model.path": cfg.model.path if cfg.model.source != "hub" else None,  # a hub id is no path
              "train.resume_from": cfg.train.resume_from}
    overrides = [f"{key}={base / value}" for locations, base in ((outputs, work_dir), (inputs, inputs_base))
                 for key, value in locations.items()
                 if value and not is_uri(value) and not value.startswith(("package:", "builtin:", "~"))
                 and not Path(value).is_absolute()]
    if cfg.tracking.uri is None:
        overrides.append(f"tracking.uri=sqlite:///{work_dir / 'mlruns' / 'mlflow.db'}")
    return cfg.with_overrides(overrides) if overrides else cfg
