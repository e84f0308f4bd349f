"""The training loop of one rank, as a library: it runs inside a Ray Train worker and, for tests and
quick iteration, in one plain process (`pipeline.train.local`).

The loop knows its rank and world size but not Ray: batches come from a `TickBatches` source and
results go to a `Reporter`. Every rank runs the same micro-steps, evals and checkpoints, because
each of them is a collective under ZeRO.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pipeline.config import Config, NoiseConfig
from pipeline.console import progress_line
from pipeline.noise import NoiseContext, noise_context, sigma_at
from pipeline.train.checkpoints import TAG_FILE, write_manifest
from pipeline.train.clock import TickClock, check_ticks_agree
from pipeline.train.objective import CausalLM, Objective
from pipeline.train.source import MicroBatch, TickBatches
from pipeline.train.startup import SHARED_TAG, Startup
from pipeline.train.tick_log import TickLog

CHECKPOINT_TAG = "tick-{tick:06d}"

SaveCheckpoint = Callable[[Path], None]  # writes this rank's checkpoint files into a local directory


class Reporter(Protocol):
    """Where a rank's results go: Ray Train's report (and checkpoint upload), or a local directory."""

    def report(self, metrics: dict, save: SaveCheckpoint | None) -> None: ...


@dataclass
class Rank:
    """One rank's engine and place in the world."""

    engine: object  # a DeepSpeed engine
    scheduler: object  # its LR scheduler
    rank: int
    world: int
    device: torch.device


@dataclass
class Progress:
    """What a checkpoint restores besides the engine: the tick, the pre-training eval, unsent metrics,
    and what defines the run's samples (the global batch, the size of the eval subset)."""

    clock: TickClock
    first_eval: dict | None = None
    unsent: list | None = None
    global_batch: int | None = None
    eval_samples: int | None = None


def train_ticks(cfg: Config, seq_len: int, me: Rank, progress: Progress, batches: TickBatches,
                evaluation: list[MicroBatch], ticks: TickLog, reporter: Reporter, say,
                samples: Callable[..., list | None] | None = None, startup: Startup | None = None,
                objective: Objective | None = None) -> None:
    """Ticks until train.max_ticks: micro-steps under the tick's noise, then log, evaluate, checkpoint.
    `samples(engine, tick)` runs after every evaluation (sample generations) and returns them;
    `samples(engine, tick, generations)` logs ones generated before. `startup` times the run's start
    and may hold a sweep's shared tick-0 evaluation. `objective`: what the model learns (its loss and
    evaluation); None, the causal LM's."""
    t = cfg.train
    engine, clock = me.engine, progress.clock
    objective = objective or CausalLM()

    def evaluate() -> tuple[dict[str, float], list | None]:
        metrics = _evaluate(objective, engine, evaluation, me.device)
        generations = samples(engine, clock.tick) if samples is not None else None
        return metrics, generations

    if progress.first_eval is None:
        shared = startup.shared if startup is not None else None
        reused = shared.load() if shared is not None else None
        if reused is None:
            progress.first_eval, generations = evaluate()
            if shared is not None:
                shared.store(progress.first_eval, generations)
        else:
            progress.first_eval, generations = reused
            startup.first_eval = f"first eval reused from {shared.location}"
            ticks.tracker.set_tags({SHARED_TAG: shared.location})
            if samples is not None and generations is not None:
                samples(engine, clock.tick, generations)
        ticks.log({**progress.first_eval, "tick": clock.tick}, clock.tick)
        say(_eval_line(objective, clock.tick, progress.first_eval,
                       f" (before training{'' if reused is None else '; the sweep computed it once'})"))
    elif startup is not None:
        startup.first_eval = "first eval from the checkpoint"
    if startup is not None:
        startup.done("first eval")
        ticks.tracker.log_metrics(startup.metrics(), step=clock.tick)
        say(startup.summary())

    if clock.tick >= t.max_ticks:  # resumed at its last tick (cut during its export, say): nothing left to train
        _report_complete(objective, evaluate, progress, ticks, reporter, say, t.max_ticks)
        return
    tokens_per_tick = t.samples_per_tick * (seq_len - 1)
    # DeepSpeed reports the global grad norm from its ZeRO and bf16 optimizers only; at stage 0 with
    # a plain torch optimizer it reports None, so there we measure the same thing ourselves.
    measure_grad_norm = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    engine.train()  # from_pretrained leaves the model in eval mode (no dropout, no noise)
    while clock.tick < t.max_ticks:
        started = time.perf_counter()
        lr = me.scheduler.get_last_lr()[0]  # the rate this tick's optimizer step uses
        sigma = sigma_at(cfg.noise.sigma, cfg.noise.decay, clock.tick)
        tick_noise = clock.tick
        micro_batches = batches.get(clock.tick)
        data_wait = time.perf_counter() - started
        # Each micro loss is its targets' loss sum over the tick's share per micro step of all targets
        # (tokens, examples, tags): DeepSpeed's mean over micro steps and ranks then gives the tick's
        # per-target mean, the same however the tick's blocks (with unequal targets) are spread over ranks.
        per_micro = torch.tensor(_tick_targets(micro_batches, me, objective) / (len(micro_batches) * me.world))
        losses = []
        for micro, batch in enumerate(micro_batches):
            # The backward pass stays inside the context: activation recomputation must see the same noise.
            with noise_context(_noise_context(cfg.noise, sigma, tick_noise, batch, me.device)):
                loss = objective.loss(engine, batch, me.device, per_micro)
                engine.backward(loss)
            if measure_grad_norm and micro == len(micro_batches) - 1:
                grad_norm = _grad_norm(engine.module)  # averaged over ranks, before clipping
            engine.step()
            losses.append(loss.detach().float())
            clock.micro_step_done(t.accum_steps)
        if not measure_grad_norm:
            reported = engine.get_global_grad_norm()
            grad_norm = float("nan") if reported is None else float(reported)
        metrics = {
            "loss": _mean_over_ranks(torch.stack(losses).mean(), me.world),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_tick / (time.perf_counter() - started),
            "data_wait_s": data_wait,  # time this rank waited for input: high means input-bound
            "noise_sigma": sigma,
            "epoch": batches.order.epoch(tick_noise),
            "tick": clock.tick,
        }
        last_tick = clock.tick == t.max_ticks
        evaluated = (t.eval_every and clock.tick % t.eval_every == 0) or last_tick
        if evaluated:
            metrics.update(evaluate()[0])
        _check_finite(metrics, cfg)
        if clock.tick % t.log_every == 0 or evaluated:
            check_ticks_agree(clock.tick, me.device)
            ticks.log(metrics, clock.tick)
            say(_progress_line(metrics, t.max_ticks))
            if evaluated:
                say(_eval_line(objective, clock.tick, metrics))
        checkpoint_due = (t.checkpoint_every and clock.tick % t.checkpoint_every == 0) or last_tick
        if checkpoint_due or evaluated:  # every eval is reported: a sweep's scheduler decides on them
            unsent = ticks.unsent() if checkpoint_due else []
            reporter.report(_with_start(metrics, progress), _saver(me, progress, unsent) if checkpoint_due else None)


def _with_start(metrics: dict, progress: Progress) -> dict:
    """A report: the tick's metrics and the pre-training evaluation's, as `<name>_start`."""
    return {**metrics, **{f"{k}_start": v for k, v in progress.first_eval.items()}}


def _report_complete(objective: Objective, evaluate, progress: Progress, ticks: TickLog, reporter: Reporter, say,
                     max_ticks: int) -> None:
    """A run resumed at train.max_ticks: its final evaluation, logged and reported with no new
    checkpoint (the driver exports the one it resumed from, and reads these metrics from the run:
    Ray Train keeps only the metrics of reports with a checkpoint)."""
    tick = progress.clock.tick
    say(f"[pipeline] the run is already complete at tick {tick} of train.max_ticks={max_ticks}: nothing is left to "
        "train, so its model is evaluated and exported (a larger train.max_ticks trains on)")
    metrics = _with_start({**evaluate()[0], "tick": tick}, progress)
    ticks.log(metrics, tick)
    say(_eval_line(objective, tick, metrics))
    reporter.report(metrics, None)


def _saver(me: Rank, progress: Progress, unsent: list) -> SaveCheckpoint:
    def save(directory: Path) -> None:
        tag = CHECKPOINT_TAG.format(tick=progress.clock.tick)
        me.engine.save_checkpoint(str(directory), tag=tag, client_state={
            "clock": progress.clock.state_dict(), "first_eval": progress.first_eval, "unsent_metrics": unsent,
            "global_batch": progress.global_batch, "eval_samples": progress.eval_samples},
            exclude_frozen_parameters=has_frozen_parameters(me.engine))
        Path(directory, TAG_FILE).write_text(tag)
        write_manifest(Path(directory), me.rank, me.world, progress.clock.tick)
    return save


def resume(me: Rank, directory: Path | None, tag: str | None, own_run: bool) -> Progress:
    """Load a local checkpoint copy into the engine (a fresh start when None; `tag` None: its
    newest); `own_run` when it is this run's own (after a restart), whose unsent metrics are then
    carried over."""
    if directory is None:
        return Progress(TickClock())
    # A checkpoint of a partly frozen model (LoRA) holds only what trains: the frozen rest is the
    # base model every rank has just loaded.
    _, client_state = me.engine.load_checkpoint(str(directory), tag=tag,
                                                load_module_strict=not has_frozen_parameters(me.engine))
    _follow_schedule(me.scheduler)
    clock = TickClock()
    clock.load_state_dict(client_state["clock"])
    return Progress(clock, client_state.get("first_eval"), client_state.get("unsent_metrics", []) if own_run else [],
                    client_state.get("global_batch"), client_state.get("eval_samples"))


def _follow_schedule(scheduler) -> None:
    """The learning rate of the restored tick, from this run's schedule. The checkpoint holds the rate
    its own schedule gave, which differs when train.max_ticks changed: a run resumed with more ticks
    trains each of them at the rate a run configured for that many from the start uses (its cosine
    is stretched over the new total, so the rate rises again from where the shorter run ended)."""
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports; LambdaLR has no public setter


def has_frozen_parameters(engine) -> bool:
    """Whether some weights do not train (LoRA's base): checkpoints then leave them out."""
    return any(not param.requires_grad for param in engine.module.parameters())


def _noise_context(noise: NoiseConfig, sigma: float, tick: int, batch: MicroBatch,
                   device: torch.device) -> NoiseContext | None:
    """The micro step's noise for both sites: σ_t for the norms, α and the example lengths for the input
    embedding (each site is off where its value is 0; no context at all when both are)."""
    alpha = noise.embedding_alpha
    if sigma == 0.0 and alpha == 0.0:
        return None
    lengths = batch.example_lengths().to(device) if alpha else None
    return NoiseContext(sigma=sigma, seed=noise.seed, tick=tick, sample_ids=batch.sample_ids.to(device),
                        neftune_alpha=alpha, example_lengths=lengths)


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _tick_targets(micro_batches: list[MicroBatch], me: Rank, objective: Objective) -> float:
    """Targets in the tick's global batch. Raw-text blocks all have the same number, so only labelled
    ones (responses of unequal length, scored tokens) need the ranks to add theirs up."""
    import torch.distributed as dist

    local = sum(objective.targets(batch) for batch in micro_batches)
    if all(batch.labels is None for batch in micro_batches):
        return float(local * me.world)
    total = torch.tensor([float(local)], dtype=torch.float64, device=me.device)
    dist.all_reduce(total)
    return float(total)


def _evaluate(objective: Objective, engine, batches: list[MicroBatch], device) -> dict[str, float]:
    """The objective's eval metrics over the run's fixed eval subset: the model in eval mode (no
    dropout), without gradients, always noise-free."""
    engine.eval()
    with torch.no_grad(), noise_context(None):
        metrics = objective.evaluate(engine, batches, device)
    engine.train()
    return metrics


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value) / world


def _progress_line(metrics: dict, total: int) -> str:
    """The tick's progress update (`pipeline.console` draws it as a bar on a terminal)."""
    return progress_line("tick", metrics["tick"], total, [
        f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}", f"grad-norm {metrics['grad_norm']:.3f}",
        f"{metrics['tokens_per_s']:.0f} tok/s"])


def _eval_line(objective: Objective, tick: int, metrics: dict, note: str = "") -> str:
    return f"[pipeline] tick {tick}: {objective.describe(metrics)}{note}"


class NonFiniteLoss(FloatingPointError):
    """The tick's loss (the same on every rank: it is averaged over them) is nan or infinite."""


def _check_finite(metrics: dict, cfg: Config) -> None:
    """Stop at the first non-finite loss, on every rank at once, instead of training on nan."""
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLoss(f"the training loss is {metrics['loss']} at tick {metrics['tick']} (train.lr "
                            f"{cfg.train.lr:g}, grad-norm {metrics['grad_norm']:.3g}): lower train.lr or check the data")
