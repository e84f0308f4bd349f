"""Per-rank memory of ZeRO-3 loading, 2 gloo ranks: the whole model loaded on every rank and then
partitioned by `deepspeed.initialize` (what `load_causal_lm` does) against the partitioned loader
(`pipeline.train.partitioned`), on SmolLM2-135M and on a ~1B-parameter Llama built from config.

Each (model, loader) pair runs in 2 fresh processes. Each rank reports the peak of its RSS above its
own baseline (after imports and the process group): until its parameters are partitioned (for the
whole-model loader that is `deepspeed.zero.Init(module=...)`, the first thing `deepspeed.initialize`
does with such a model), then through `deepspeed.initialize` (on CPU this adds DeepSpeed's flat fp32
partitions, master weights and gradient buffers, which a GPU run keeps in GPU memory) and the first
optimizer step (batch 1 x 128, fp32, AdamW). The target is a peak until the parameters are
partitioned of at most about (fp32 model / ranks) x 1.3.

    .venv/bin/python bench/partitioned_memory.py            # both models (~8 min, ~16 GiB of RAM)
    .venv/bin/python bench/partitioned_memory.py --small    # SmolLM2 only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORLD = 2
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True)


def rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


class PrivatePeak:
    """The peak of RssAnon (private memory, without file pages such as memory-mapped weights, which
    the page cache shares between ranks), sampled every millisecond on a thread."""

    def __init__(self):
        import threading

        self.peak = rss_mib("RssAnon")
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mib("RssAnon"))

    def take(self) -> float:
        peak, self.peak = self.peak, rss_mib("RssAnon")
        return peak


def rank_main(rank: int, model_dir: str, loader: str, step: bool, init_file: str, out_dir: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)

    from pipeline.models import load_causal_lm, patch_norms
    from pipeline.train.partitioned import load_partitioned_causal_lm

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    # Buckets of 5e7 elements (DeepSpeed's default reduce bucket of 5e8 is a 2 GB fp32 buffer on
    # each CPU rank, which would hide what the loaders differ in); the same for both loaders.
    ds_config = {"train_batch_size": WORLD, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7}}
    reset_peak()
    baseline, private_baseline = rss_mib("VmRSS"), rss_mib("RssAnon")
    private = PrivatePeak()
    started = time.perf_counter()
    if loader == "partitioned":
        model = load_partitioned_causal_lm(model_dir, ds_config)
    else:
        model = load_causal_lm(model_dir)  # memory-mapped: nothing is read yet
        # What deepspeed.initialize does first with a model not built under zero.Init: partition it
        # (rank 0's values broadcast into every rank's copy, which makes the whole model private).
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    patch_norms(model, backend="torch")
    load = {"load_peak_mib": rss_mib("VmHWM") - baseline, "load_private_mib": private.take() - private_baseline,
            "load_s": time.perf_counter() - started}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    load["init_peak_mib"] = rss_mib("VmHWM") - baseline
    load["init_private_mib"] = private.take() - private_baseline
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(load))  # kept if the step runs out of memory
    if not step:
        return
    tokens = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=tokens, labels=tokens).loss
    engine.backward(loss)
    engine.step()
    tick = {"tick_peak_mib": rss_mib("VmHWM") - baseline, "tick_private_mib": private.take() - private_baseline,
            "baseline_mib": baseline, "loss": float(loss),
            "to_first_step_s": time.perf_counter() - started}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({**load, **tick}))
    dist.destroy_process_group()


def run_case(model_dir: str, loader: str, step: bool, scratch: Path) -> tuple[list[dict], float]:
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    try:
        mp.start_processes(rank_main, args=(model_dir, loader, step, str(out / "init"), str(out)), nprocs=WORLD,
                           start_method="spawn")
    except mp.ProcessExitedException as error:  # the kernel's OOM killer: what a rank got through is kept
        print(f"{loader}: {error}", flush=True)
    ranks = [json.loads(path.read_text()) if path.exists() else {} for path in
             (out / f"rank{r}.json" for r in range(WORLD))]
    return ranks, time.perf_counter() - started


def smollm2_dir(scratch: Path) -> str:
    from pipeline.config import load_config
    from pipeline.models import materialize_model

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.cache_dir={scratch / 'models'}"])
    return materialize_model(cfg.model)


def llama_1b_dir(scratch: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = scratch / "llama-1b"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA_1B)).save_pretrained(directory,
                                                                                      max_shard_size="1GB")
    return str(directory)


def fp32_mib(model_dir: str) -> float:
    from pipeline.models.weights import WeightFiles

    return sum(t.numel for t in WeightFiles(model_dir).tensors.values()) * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="SmolLM2 only")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        # The 1B model's first step needs more than 24 GiB for 2 CPU ranks (AdamW state, fp32 master
        # and gradient partitions, beside the model), whichever the loader: it stops after initialize.
        models = [("SmolLM2-135M", smollm2_dir, True)]
        models += [] if args.small else [("Llama ~1B (from config)", llama_1b_dir, False)]
        for name, build, step in models:
            model_dir = build(scratch)
            share = fp32_mib(model_dir) / WORLD
            for loader in ("whole", "partitioned"):
                ranks, wall = run_case(model_dir, loader, step, scratch)
                rows.append((name, fp32_mib(model_dir), share, loader, ranks, wall))
                print(json.dumps({"model": name, "loader": loader, "ranks": ranks, "wall_s": wall}), flush=True)
    print("\nPeak above each rank's baseline, MiB (x fp32 model / ranks), rank 0 / rank 1: RSS (with file pages,"
          " e.g. memory-mapped weights) and private memory (RssAnon)")
    print("| model | fp32 model | model / ranks | loader | to partitions: RSS | to partitions: private | + deepspeed.initialize: RSS "
          "| + initialize: private | + first step: RSS | load s | whole process s |")
    print("|---|---:|---:|---|---|---|---|---|---|---:|---:|")
    for name, total, share, loader, ranks, wall in rows:
        def peaks(key: str) -> str:
            return " / ".join(f"{r[key]:.0f} ({r[key] / share:.2f}x)" if key in r else "not run" for r in ranks)

        seconds = max((r.get("load_s", float("nan")) for r in ranks), default=float("nan"))
        print(f"| {name} | {total:.0f} | {share:.0f} | {loader} | {peaks('load_peak_mib')} | {peaks('load_private_mib')} "
              f"| {peaks('init_peak_mib')} | {peaks('init_private_mib')} | {peaks('tick_peak_mib')} | {seconds:.1f} "
              f"| {wall:.1f} |")


if __name__ == "__main__":
    main()
