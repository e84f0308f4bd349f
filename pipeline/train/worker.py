"""The training loop that runs inside each Ray Train worker: DeepSpeed over a HF causal LM.

Rank 0 alone logs (console and MLflow). Every rank runs the same number of micro-steps, evals and
checkpoints, because each of them is a collective under ZeRO.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import Config, NoiseConfig, is_uri
from pipeline.noise import NoiseContext, noise_context, sigma_at
from pipeline.tracking import NullTracker, RunTarget
from pipeline.tracking.buffer import BufferedTracker
from pipeline.tracking.secrets import redact
from pipeline.train.checkpoints import MANIFEST, TAG_FILE, local_checkpoint, resume_point, write_manifest
from pipeline.train.clock import TickClock, check_ticks_agree
from pipeline.train.schedule import deepspeed_config, lr_multiplier
from pipeline.train.tick_log import TickLog

CHECKPOINT_TAG = "tick-{tick:06d}"


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, resolved by the driver before Ray Train starts."""

    config: Config
    model_ref: str  # a HF directory: local, or a URI each node copies from (or a hub id)
    run: RunTarget | None
    seq_len: int
    # Where Ray Train stores this run's checkpoints, which this worker uploads itself: a URI, or a
    # local path every node shares. Canonical (storage.resolve): checkpoints are compared with it.
    run_dir: str


def train_worker(plan: WorkerPlan) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from pipeline.models import load_causal_lm, patch_norms_with_report

    storage.configure(plan.config.storage)  # a worker process has the driver's settings only through the plan
    cfg = plan.config.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    torch.manual_seed(cfg.seed)

    model = load_causal_lm(plan.model_ref)
    model.config.use_cache = False
    norms = patch_norms_with_report(model, backend=plan.config.kernel.backend)  # before ZeRO partitions weights
    schedule = lr_multiplier(cfg, cfg.max_ticks)
    optimizer = None if cfg.use_gpu else torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    # Rank 0 alone prints, and never a credential (an error message may quote the tracking URI).
    say = (lambda text: print(redact(text), flush=True)) if rank == 0 else (lambda text: None)
    clock = TickClock()
    first_eval = None
    carried = []  # metrics rank 0 had not sent when the checkpoint was written
    with _checkpoint_to_resume(plan, say) as (location, directory):
        if directory:
            _, client_state = engine.load_checkpoint(str(directory))
            say(f"[pipeline] resumed from {location} at tick {client_state['clock']['tick']}")
            clock.load_state_dict(client_state["clock"])
            first_eval = client_state.get("first_eval")
            if location.startswith(plan.run_dir.rstrip("/") + "/"):  # this run's own checkpoint
                carried = client_state.get("unsent_metrics", [])

    tracker = (BufferedTracker(plan.run, plan.config.tracking.flush_timeout_s, _spill_dir(cfg.output_dir))
               if rank == 0 and plan.run else NullTracker())
    say(f"[pipeline] fused norms: {norms.summary()}")
    tracker.log_params({"norms.replaced": norms.replaced, "norms.in_blocks": norms.in_blocks,
                        "norms.blocks": norms.blocks})
    try:
        _train(plan, engine, scheduler, clock, first_eval, TickLog(tracker, clock.tick, say, carried), say)
    finally:
        warning = tracker.close() if isinstance(tracker, BufferedTracker) else None
        if warning:
            say(f"[pipeline] {warning}")


def _train(plan: WorkerPlan, engine, scheduler, clock: TickClock, first_eval: dict | None, ticks: TickLog,
           say) -> None:
    """Ticks until train.max_ticks: micro-steps under the tick's noise, then log, evaluate, checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = plan.config.train
    device, world = ray.train.torch.get_device(), ray.train.get_context().get_world_size()
    eval_shard = ray.train.get_dataset_shard("eval")
    batches = _micro_batches(ray.train.get_dataset_shard("train"), cfg.micro_batch_size, cfg.accum_steps * clock.tick)

    def evaluate() -> dict[str, float]:
        loss = _evaluate(engine, eval_shard, cfg.micro_batch_size, device)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    if first_eval is None:
        first_eval = evaluate()
        ticks.log({**first_eval, "tick": clock.tick}, clock.tick)
        say(f"[pipeline] tick {clock.tick}: eval loss {first_eval['eval_loss']:.4f}, "
            f"perplexity {first_eval['eval_perplexity']:.2f} (before training)")

    tokens_per_tick = cfg.samples_per_tick * (plan.seq_len - 1)
    # DeepSpeed reports the global grad norm from its ZeRO and bf16 optimizers only; at stage 0 with
    # a plain torch optimizer it reports None, so there we measure the same thing ourselves.
    measure_grad_norm = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    engine.train()  # from_pretrained leaves the model in eval mode (no dropout, no noise); a resume skips eval
    while clock.tick < cfg.max_ticks:
        started = time.perf_counter()
        losses = []
        data_wait = 0.0
        lr = scheduler.get_last_lr()[0]  # the rate this tick's optimizer step uses
        sigma = sigma_at(plan.config.noise.sigma, plan.config.noise.decay, clock.tick)
        for micro in range(cfg.accum_steps):
            fetch_started = time.perf_counter()
            batch = next(batches)
            input_ids = batch["input_ids"].to(device=device, dtype=torch.long)
            data_wait += time.perf_counter() - fetch_started
            # The backward pass stays inside the context: activation recomputation must see the same noise.
            with noise_context(_noise_context(plan.config.noise, sigma, clock.tick, batch["sample_id"], device)):
                loss = engine(input_ids=input_ids, labels=input_ids).loss
                engine.backward(loss)
            if measure_grad_norm and micro == cfg.accum_steps - 1:
                grad_norm = _grad_norm(engine.module)  # averaged over ranks, before clipping
            engine.step()
            losses.append(loss.detach().float())
            clock.micro_step_done(cfg.accum_steps)
        if not measure_grad_norm:
            reported = engine.get_global_grad_norm()
            grad_norm = float("nan") if reported is None else float(reported)
        metrics = {
            "loss": _mean_over_ranks(torch.stack(losses).mean(), world),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_tick / (time.perf_counter() - started),
            "data_wait_s": data_wait,  # time this rank waited for input: high means input-bound
            "noise_sigma": sigma,
            "tick": clock.tick,
        }
        last_tick = clock.tick == cfg.max_ticks
        evaluated = (cfg.eval_every and clock.tick % cfg.eval_every == 0) or last_tick
        if evaluated:
            metrics.update(evaluate())
        if clock.tick % cfg.log_every == 0 or evaluated:
            check_ticks_agree(clock.tick, device)
            ticks.log(metrics, clock.tick)
            say(_progress_line(metrics, cfg.max_ticks))
        checkpoint_due = (cfg.checkpoint_every and clock.tick % cfg.checkpoint_every == 0) or last_tick
        if checkpoint_due or evaluated:  # every eval is reported: a sweep's scheduler decides on them
            _report(plan, engine, clock, first_eval, metrics, with_checkpoint=checkpoint_due,
                    unsent=ticks.unsent() if checkpoint_due else [])


@contextlib.contextmanager
def _checkpoint_to_resume(plan: WorkerPlan, say):
    """(location, local directory) of the checkpoint to resume from, verified against its manifests,
    or (None, None) for a fresh start.

    First choice: the newest valid checkpoint in this run's own storage (after a restart). Looking
    there, rather than only at the checkpoint Ray registered, also finds one every rank had finished
    uploading when a worker died just before Ray registered it. Rank 0 chooses (hashing every file
    once, not once per rank) and tells the others, so all ranks load the same one; else
    train.resume_from (verified by the driver). Every rank then reads it from a local copy: DeepSpeed
    loads every rank's ZeRO shards, so each rank downloads the whole checkpoint when it is remote."""
    import ray.train
    import torch.distributed as dist

    decision = [None, []]
    if ray.train.get_context().get_world_rank() == 0:
        decision = list(resume_point(plan.run_dir, plan.config.train.resume_from))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    location, warnings = decision
    for warning in warnings:
        say(f"[pipeline] {warning}")
    if location is None:
        yield None, None
        return
    with local_checkpoint(location) as directory:
        yield location, directory


def _spill_dir(output_dir: str) -> Path:
    """Where rank 0 writes tracking records it could not send: beside the checkpoints when they are
    on local or shared disk; on this node's local disk when they are in object storage (the warning
    that names the file says on which node)."""
    return storage.local_cache_root() / "unsent-tracking" if is_uri(output_dir) else Path(output_dir).resolve()


def _noise_context(noise: NoiseConfig, sigma: float, tick: int, sample_ids: torch.Tensor,
                   device: torch.device) -> NoiseContext | None:
    if sigma == 0.0:
        return None
    return NoiseContext(sigma=sigma, seed=noise.seed, tick=tick,
                        sample_ids=sample_ids.to(device=device, dtype=torch.int64))


def _micro_batches(shard, micro_batch_size: int, skip: int):
    """Micro batches forever, epoch after epoch. `skip` fast-forwards past already-trained ones."""
    seen = 0
    while True:
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=True):
            seen += 1
            if seen > skip:
                yield batch
        if seen == 0:
            raise RuntimeError("the training shard of this worker is empty: add data or lower "
                               "train.num_workers or train.micro_batch_size")


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _evaluate(engine, eval_shard, micro_batch_size: int, device) -> float:
    """Mean next-token loss over this run's bounded eval subset, summed across all ranks."""
    import torch.distributed as dist

    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), noise_context(None):  # evaluation is always noise-free
        for batch in eval_shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=True):
            input_ids = batch["input_ids"].to(device=device, dtype=torch.long)
            predicted = input_ids.numel() - input_ids.shape[0]  # the first token of each row has no target
            totals[0] += engine(input_ids=input_ids, labels=input_ids).loss.double() * predicted
            totals[1] += predicted
    engine.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value) / world


def _report(plan: WorkerPlan, engine, clock: TickClock, first_eval: dict, metrics: dict, with_checkpoint: bool,
            unsent: list) -> None:
    import ray.train

    report = {**metrics, **{f"{k}_start": v for k, v in first_eval.items()}}
    if not with_checkpoint:
        ray.train.report(report)
        return
    tag = CHECKPOINT_TAG.format(tick=clock.tick)
    context = ray.train.get_context()
    with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
        engine.save_checkpoint(directory, tag=tag,
                               client_state={"clock": clock.state_dict(), "first_eval": first_eval,
                                             "unsent_metrics": unsent})
        Path(directory, TAG_FILE).write_text(tag)
        write_manifest(Path(directory), context.get_world_rank(), context.get_world_size(), clock.tick)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_upload_fn=functools.partial(_upload, plan.run_dir, context.get_world_rank()))


def _upload(run_dir: str, rank: int, checkpoint, checkpoint_dir_name: str):
    """Ray's checkpoint_upload_fn: this rank's files into `<run_dir>/<checkpoint_dir_name>/`, its
    manifest after all of them (the commit: object stores have no rename). Every rank uploads into
    the same directory; Ray registers it once every rank's upload has returned."""
    import ray.train

    storage.upload_dir(Path(checkpoint.path), storage.join(run_dir, checkpoint_dir_name),
                       last=[MANIFEST.format(rank=rank)])
    # Ray manages (keeps K, deletes older) only checkpoints on its own storage filesystem object.
    ray_storage = ray.train.get_context().get_storage()
    return ray.train.Checkpoint(path=posixpath.join(ray_storage.experiment_fs_path, checkpoint_dir_name),
                                filesystem=ray_storage.storage_filesystem)


def _progress_line(metrics: dict, total: int) -> str:
    line = (f"[pipeline] tick {metrics['tick']}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"grad-norm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s")
    if "eval_loss" in metrics:
        line += f" | eval loss {metrics['eval_loss']:.4f} ppl {metrics['eval_perplexity']:.2f}"
    return line
