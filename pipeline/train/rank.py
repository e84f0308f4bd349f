"""One rank from start to finish, Ray or not: build the engine, resume, train, close the tracker.

`train.worker` runs this inside Ray Train; `train.local` runs it in one plain process. Both pass the
rank's place in the world and a `Reporter`; everything else comes from the `WorkerPlan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import console, storage
from pipeline.config import Config, NoiseConfig, is_uri
from pipeline.data import PreparedData
from pipeline.data.order import SampleOrder
from pipeline.tracking import NullTracker, RunTarget
from pipeline.tracking.buffer import BufferedTracker
from pipeline.tracking.secrets import redact
from pipeline.train.checkpoints import local_checkpoint, needs_conversion, resume_point, saved_world_size, universal_copy
from pipeline.train.loop import Rank, Reporter, resume, train_ticks
from pipeline.train.objective import objective_for
from pipeline.train.partitioned import load_partitioned_causal_lm
from pipeline.train.precision import check_trains_in, training_dtype
from pipeline.train.samples import SampleGenerations
from pipeline.train.schedule import deepspeed_config, lr_multiplier
from pipeline.train.source import TickBatches, eval_batches
from pipeline.train.startup import SharedFirstEval, Startup, first_eval_key
from pipeline.train.tick_log import TickLog


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a rank needs, resolved by the driver before training starts."""

    config: Config
    model_ref: str  # a HF directory: local, or a URI each node copies from (or a hub id)
    run: RunTarget | None
    data: PreparedData  # the packed cache: its token files, read by sample id
    # Where this run's checkpoints are stored (each rank uploads its own files): a URI, or a local
    # path every node shares. Canonical (storage.resolve): checkpoints are compared with it.
    run_dir: str
    # Wall-clock marks the driver took before the workers started ((part, time.time()), in order),
    # for the start-up line (`train.startup`); and, in a sweep, where its trials share the tick-0 eval.
    marks: tuple[tuple[str, float], ...] = ()
    first_eval_dir: str | None = None


def sample_order(cfg: Config, data: PreparedData) -> SampleOrder:
    return SampleOrder(blocks=data.blocks("train"), global_batch=cfg.train.samples_per_tick, seed=cfg.train.seed,
                       shuffle=cfg.train.shuffle)


def build_model(config: Config, model_ref: str, label_names: tuple[str, ...] = ()):
    """The HF model as every rank trains it: fused norms, the NEFTune hook on the input embedding, the
    configured attention, activation checkpointing, and at ZeRO-3 already partitioned (no rank holds
    it whole); (model, the norm report). A classification task's encoder gets its head for
    `label_names` (the prepared data's classes), new and seeded alike on every rank."""
    from pipeline.models import attach_embedding_noise, load_causal_lm, load_classifier, patch_norms_with_report

    torch.manual_seed(config.train.seed)
    attention = config.model.attn_implementation
    if config.model.task != "causal_lm":  # at stages 0-2 (launch.check_task): the partitioned loader is an LM's
        model = load_classifier(model_ref, config.model.task, label_names, attn_implementation=attention)
    elif config.train.zero_stage == 3:
        model = load_partitioned_causal_lm(model_ref, deepspeed_config(config.train), attention)
    else:
        model = load_causal_lm(model_ref, attn_implementation=attention)
    model.config.use_cache = False
    norms = patch_norms_with_report(model, backend=config.kernel.backend)  # before deepspeed.initialize hooks modules
    attach_embedding_noise(model)  # adds noise only where noise.site puts it on the embedding (alpha > 0)
    if config.train.gradient_checkpointing:
        # Non-reentrant: recomputation runs inside the tick's noise context, so it draws the same ε.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.model.lora is not None:  # after the patch: the adapters wrap Linear layers, the fused norms stay
        from pipeline.models.lora import apply_lora

        model = apply_lora(model, config.model.lora)
    return model, norms


def _build_rank(plan: WorkerPlan, rank: int, world: int, device: torch.device, universal: bool, startup: Startup):
    """The model with fused norms, under a DeepSpeed engine; `universal` when it will load a
    universal checkpoint (written by another number of ranks)."""
    cfg = plan.config.train
    model, norms = build_model(plan.config, plan.model_ref, plan.data.label_names)
    startup.done("model")
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, but under LoRA
    optimizer = None if cfg.use_gpu else torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    config = deepspeed_config(cfg)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=trainable, config=config, dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, cfg.max_ticks)))
    check_trains_in(engine.module, training_dtype(config), "after DeepSpeed built the engine")
    startup.done("DeepSpeed")
    return Rank(engine, scheduler, rank, world, device), norms


def _check_same_samples(progress, global_batch: int) -> None:
    """A resumed run must keep the global batch: tick t's samples are defined by it."""
    if progress.global_batch is not None and progress.global_batch != global_batch:
        raise ValueError(f"train.global_batch_size: the checkpoint trained {progress.global_batch} samples per tick "
                         f"and this run would train {global_batch}; set train.global_batch_size="
                         f"{progress.global_batch} to continue the same run")


def eval_samples(cfg: Config, data: PreparedData) -> int:
    """The size of the fixed eval subset: eval_batches global micro batches, or the whole split
    when it is smaller (each rank's share is rounded down, `source.eval_batches`)."""
    t = cfg.train
    return min(data.blocks("eval"), t.eval_batches * t.micro_batch_size * t.num_workers)


def run_rank(plan: WorkerPlan, rank: int, world: int, local_world: int, device: torch.device,
             reporter: Reporter) -> int:
    """Train this rank to train.max_ticks; the number of training samples it read."""
    startup = Startup(plan.marks)
    storage.configure(plan.config.storage)  # a worker process has the driver's settings only through the plan
    configured = plan.config
    resized = world != configured.train.num_workers  # a worker range (train.min_workers)
    if resized:  # the same global batch, more accumulation
        plan = dataclasses.replace(plan, config=configured.with_overrides([f"train.num_workers={world}"]))
    cfg = plan.config.train
    torch.set_num_threads(cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // local_world))
    # Rank 0 alone prints, and never a credential (an error message may quote the tracking URI).
    say = (lambda text: console.say(redact(text))) if rank == 0 else (lambda text: None)
    if resized:
        say(f"[pipeline] training on {world} of train.num_workers={configured.train.num_workers} workers: "
            f"{cfg.accum_steps} micro batches of {cfg.micro_batch_size} per rank per tick, the same global batch")
    with contextlib.ExitStack() as stack:
        location, directory = stack.enter_context(_checkpoint_to_resume(plan, rank, world, say))
        tag = None
        if directory is not None and needs_conversion(directory, world):
            say(f"[pipeline] the checkpoint was written by {saved_world_size(directory)} ranks and {world} resume "
                "it: converting it to DeepSpeed's universal format")
            directory, tag = stack.enter_context(universal_copy(directory))
        me, norms = _build_rank(plan, rank, world, device, universal=tag is not None, startup=startup)
        progress = resume(me, directory, tag, own_run=bool(location) and location.startswith(plan.run_dir.rstrip("/") + "/"))
        if location:
            say(f"[pipeline] resumed from {location} at tick {progress.clock.tick}")
            startup.done("resume")

    _check_same_samples(progress, cfg.samples_per_tick)
    data = plan.data
    progress.global_batch = cfg.samples_per_tick
    # The eval subset a run started with stays its subset (eval_loss_start is measured on it).
    progress.eval_samples = progress.eval_samples or eval_samples(configured, data)
    if plan.first_eval_dir is not None:
        key = first_eval_key(plan.config, plan.model_ref, data.fingerprint, progress.eval_samples, world)
        startup.shared = SharedFirstEval(plan.first_eval_dir, key, rank, world)
    tracker = (BufferedTracker(plan.run, plan.config.tracking.flush_timeout_s, _spill_dir(cfg.output_dir))
               if rank == 0 and plan.run else NullTracker())
    batches = None
    try:
        say(f"[pipeline] fused norms: {norms.summary()}")
        if plan.config.model.lora is not None:
            from pipeline.models.lora import parameter_counts

            trainable, total = parameter_counts(me.engine.module)
            say(f"[pipeline] LoRA: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})")
            tracker.log_params({"lora.trainable_parameters": trainable, "lora.all_parameters": total})
        say(f"[pipeline] noise: {_noise_summary(plan.config.noise)}")
        tracker.log_params({"norms.replaced": norms.replaced, "norms.in_blocks": norms.in_blocks,
                            "norms.blocks": norms.blocks})
        batches = TickBatches(data.reader("train"), sample_order(plan.config, data), rank, world,
                              cfg.micro_batch_size, end_tick=cfg.max_ticks)
        evaluation = eval_batches(data.reader("eval"), progress.eval_samples, rank, world, cfg.micro_batch_size)
        ticks, samples = TickLog(tracker, progress.clock.tick, say, progress.unsent or []), _sample_generations(plan, tracker)
        startup.done("tracking")
        train_ticks(plan.config, data.seq_len, me, progress, batches, evaluation, ticks, reporter, say, samples, startup,
                    objective_for(plan.config, data.label_names))
        check_trains_in(me.engine.module, training_dtype(deepspeed_config(cfg)), f"at tick {progress.clock.tick}")
    finally:
        if batches is not None:
            batches.close()
        warning = tracker.close()
        if warning:
            say(f"[pipeline] {warning}")
    return batches.reader.samples_read


def _noise_summary(noise: NoiseConfig) -> str:
    norms = f"sigma {noise.sigma:g}, decay {noise.decay:g}" if noise.sigma else "off"
    embedding = f"NEFTune alpha {noise.embedding_alpha:g}" if noise.embedding_alpha else "off"
    return f"norms {norms}; input embedding {embedding}; seed {noise.seed}"


def _sample_generations(plan: WorkerPlan, tracker) -> SampleGenerations | None:
    """Held-out prompts answered at every evaluation, for the example formats."""
    wanted = plan.config.tracking.sample_prompts
    if not (plan.config.data.has_examples and wanted and plan.data.samples):
        return None
    return SampleGenerations(plan.data.samples[:wanted], plan.model_ref, plan.config.tracking.max_new_tokens, tracker,
                             partitioned=plan.config.train.zero_stage == 3)


@contextlib.contextmanager
def _checkpoint_to_resume(plan: WorkerPlan, rank: int, world: int, say):
    """(location, local directory) of the checkpoint to resume from, verified against its manifests,
    or (None, None) for a fresh start.

    First choice: the newest valid checkpoint in this run's own storage (after a restart). Looking
    there, rather than only at the checkpoint Ray registered, also finds one every rank had finished
    uploading when a worker died just before Ray registered it. Else the newest valid one at
    train.resume_from (the driver checked only its listing and manifests). Each rank hashes its own
    share of a candidate's files and the ranks agree on one verdict, so all load the same checkpoint
    and no process hashes all of it. Every rank then reads it from a local copy: DeepSpeed loads
    every rank's ZeRO shards, so each rank downloads the whole checkpoint when it is remote."""
    location, warnings = resume_point(plan.run_dir, plan.config.train.resume_from, _agreed_verdict(rank, world))
    for warning in warnings:
        say(f"[pipeline] {warning}")
    if location is None:
        yield None, None
        return
    with local_checkpoint(location) as directory:
        yield location, directory


def _agreed_verdict(rank: int, world: int):
    """A `Verify` for one rank of `world`: it hashes its share, then the ranks exchange verdicts, and
    a checkpoint any rank finds wrong is wrong for all (the lowest such rank's reason is given)."""
    import torch.distributed as dist

    def verify(stored) -> str | None:
        problem = stored.problem((rank, world))
        if world == 1:
            return problem
        verdicts = [None] * world
        dist.all_gather_object(verdicts, (stored.location, problem))
        if len({where for where, _ in verdicts}) > 1:
            raise RuntimeError(f"the ranks are judging different checkpoints: {sorted({w for w, _ in verdicts})}")
        return next((problem for _, problem in verdicts if problem), None)

    return verify


def _spill_dir(output_dir: str) -> Path:
    """Where rank 0 writes tracking records it could not send: beside the checkpoints when they are
    on local or shared disk; on this node's local disk when they are in object storage (the warning
    that names the file says on which node)."""
    return storage.local_cache_root() / "unsent-tracking" if is_uri(output_dir) else Path(output_dir).resolve()
