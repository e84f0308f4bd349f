"""The driver side of `pipeline train`: resolve the model and data, run the TorchTrainer, export
the consolidated model, and record everything in one MLflow run."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import console, storage
from pipeline.config import Config, ConfigError
from pipeline.data import PreparedData, prepare_data, prepare_model
from pipeline.models.lora import check_lora
from pipeline.runtime import ensure_ray
from pipeline.tracking.secrets import redact
from pipeline.train.checkpoints import (
    CheckpointError,
    checkpoint_tick,
    choose_checkpoint,
    describe_fallback,
    resume_point,
    verify_sizes_only,
    weights_only,
)
from pipeline.train.classify import summary_lines
from pipeline.train.export import export_in_task
from pipeline.train.rank import WorkerPlan
from pipeline.train.resources import check_against_cluster, wait_for_workers
from pipeline.train.worker import train_worker


class TrainingFailed(RuntimeError):
    """Training stopped on the workers; the message names each failed rank and its error."""


def describe_failure(error: Exception) -> str:
    """One line per failed rank instead of Ray's nested traceback (which is still logged above)."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return str(error).strip().splitlines()[-1]
    ranks_by_error: dict[str, list[int]] = {}  # ranks that failed alike are named together
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        ranks_by_error.setdefault(f"{type(cause).__name__}: {message}", []).append(rank)
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {error}"
                     for error, ranks in ranks_by_error.items())


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    tracking_uri: str
    run_name: str
    metrics: dict
    model_dir: Path  # the exported HF directory on the node that exported it (this one, on one machine)
    model_location: str  # where it is stored: model_dir itself, or its URI under train.output_dir
    model_uri: str | None  # MLflow's
    checkpoint: str  # the final checkpoint's location (local path or URI)
    adapter_location: str | None = None  # under LoRA: the peft adapter directory
    adapter_uri: str | None = None
    run_page: str = ""  # the run's page in the MLflow UI (Model training view)

    @property
    def checkpoint_dir(self) -> Path:
        """The final checkpoint as a local path (when train.output_dir is not object storage)."""
        return storage.local_path(self.checkpoint)

    def summary(self) -> str:
        m = self.metrics
        classifier = "eval_perplexity" not in m  # a classifier's eval has accuracy instead
        lines = [
            *(summary_lines(m) if classifier else [
                f"eval loss  before {m['eval_loss_start']:.4f}  after {m['eval_loss']:.4f}",
                f"perplexity before {m['eval_perplexity_start']:.2f}  after {m['eval_perplexity']:.2f}"]),
            f"model: {self.model_location}" + (f" (local copy {self.model_dir})"
                                               if self.model_location != str(self.model_dir) else ""),
            f"MLflow run {self.run_id} ({self.run_name}) in {redact(self.tracking_uri)}",
            f"  browse: {self.run_page}" if self.tracking_uri.startswith(("http://", "https://")) else
            f"  browse: pipeline ui (mlflow ui --backend-store-uri {redact(self.tracking_uri)} --host 127.0.0.1 "
            f"--port 5000), then {self.run_page}",
        ]
        if self.adapter_location:
            lines.append(f"adapter: {self.adapter_location} (LoRA; the model above has it merged in)")
        if self.model_uri:
            lines.append(f"  load:   mlflow.pyfunc.load_model('{self.model_uri}')")
        return "\n".join(lines)


def check_kernel(cfg: Config) -> None:
    """GPU-only settings on a CPU run, or a kernel whose package is missing: one line naming the field."""
    import importlib.util

    if cfg.kernel.backend == "triton" and not cfg.train.use_gpu:
        raise ConfigError("kernel.backend: 'triton' runs on GPUs and train.use_gpu is false; use 'auto' or 'torch'")
    if cfg.model.attn_implementation == "flash_attention_2":
        if not cfg.train.use_gpu:
            raise ConfigError("model.attn_implementation: flash_attention_2 runs on GPUs and train.use_gpu is false; "
                              "use 'sdpa' or 'eager'")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                              "not installed; use 'sdpa' or install flash-attn")


def check_task(cfg: Config) -> None:
    """What a classification task does not train (yet), as one line naming the field."""
    task = cfg.model.task
    if task == "causal_lm":
        return
    if cfg.train.zero_stage == 3:  # the partitioned loader builds a causal LM and fills it from the files
        raise ConfigError(f"train.zero_stage: 3 loads causal LMs only; model.task '{task}' trains at stages 0-2")
    if cfg.model.lora is not None:  # its adapters are a causal LM's (peft's CAUSAL_LM task), exported merged as one
        raise ConfigError(f"model.lora: LoRA adapts causal LMs only; model.task '{task}' fine-tunes the whole "
                          "encoder (model.lora=null)")


def resolve_resume(cfg: Config) -> Config:
    """train.resume_from may name a checkpoint or a run's storage directory: pin it to the newest
    checkpoint whose listing matches its manifests, warning about any newer one that is partial.
    The file contents are hashed by the ranks, each its own share (`train.rank`), not here."""
    if cfg.train.resume_from is None:
        return cfg
    location = cfg.train.resume_from  # a local path or a URI
    if not storage.is_dir(location):
        raise ConfigError(f"train.resume_from: {location} is not a directory")
    try:
        chosen, skipped = choose_checkpoint(location, verify_sizes_only)
    except CheckpointError as error:
        raise ConfigError(f"train.resume_from: {error}") from None
    if weights_only(chosen):
        raise ConfigError(f"train.resume_from: {chosen} holds weights only (its optimizer state was dropped after its "
                          f"sweep); fine-tune from its exported model instead (model.source=hf_dir)")
    if skipped:
        console.warn(describe_fallback(chosen, skipped))
    tick = checkpoint_tick(chosen)
    if tick is not None and tick > cfg.train.max_ticks:
        raise ConfigError(f"train.max_ticks: {cfg.train.max_ticks} is below the tick of the checkpoint to resume "
                          f"({chosen} is at tick {tick}); set train.max_ticks={tick} to export it, or more to train on")
    return cfg.with_overrides([f"train.resume_from={chosen}"])


def check_against_data(cfg: Config, data: PreparedData) -> None:
    t = cfg.train
    if data.blocks("train") < t.samples_per_tick:
        raise ConfigError(f"data: only {data.blocks('train')} training blocks, fewer than one global batch "
                          f"({t.samples_per_tick} = micro_batch_size x accumulation steps x num_workers)")
    if data.blocks("eval") < t.num_workers * t.micro_batch_size:
        raise ConfigError(f"data.split: only {data.blocks('eval')} evaluation blocks, fewer than one micro "
                          f"batch per worker ({t.num_workers} x {t.micro_batch_size}); hold out more documents")


def prepare(cfg: Config) -> tuple[str, PreparedData]:
    """What training needs before its workers start: a reachable tracking store and a usable model
    (both before Ray starts), Ray (with the dashboard, which sweeps need) with room for the run,
    then the packed data."""
    from pipeline.tracking import check_reachable, tracking_uri

    check_kernel(cfg)
    check_task(cfg)
    check_reachable(tracking_uri(cfg.tracking.uri), cfg.tracking.connect_timeout_s)
    model_ref = prepare_model(cfg)
    check_lora(cfg.model.lora, model_ref)
    ensure_ray(cfg.ray)
    check_against_cluster(cfg)
    return model_ref, prepare_data(cfg.data, model_ref, cfg.ray)


def run_training(cfg: Config) -> TrainOutcome:
    from pipeline import tracking

    cfg = resolve_resume(cfg)
    model_ref, data = prepare(cfg)
    console.echo(data.summary())
    check_against_data(cfg, data)
    run_name = cfg.tracking.run_name or f"{cfg.tracking.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = tracking.start_run(cfg, run_name, tags={"data.fingerprint": data.fingerprint}, command="pipeline train",
                                 data=data, model=tracking.ModelPlan() if cfg.tracking.log_model else None)
    # Ray Train resumes a run whose name it finds in storage, and run names repeat (a fixed
    # tracking.run_name, two starts in one second): key storage and outputs by the MLflow run too.
    run_key = f"{run_name}-{tracker.target.run_id[:8]}"
    output = storage.resolve(cfg.train.output_dir)
    with tracking.run_status(tracker.target):
        tracker.log_params({"data.train_blocks": data.blocks("train"), "data.eval_blocks": data.blocks("eval"),
                            "model.resolved": model_ref, "data.bad_records": sum(data.bad_records.values()),
                            **{f"data.bad_records.{reason}": count for reason, count in data.bad_records.items()}})
        storage_location = storage.join(output, "ray")
        result = fit(cfg, model_ref, data, tracker.target, run_key, storage_location)
        checkpoint = stored_checkpoint(result, storage_location, run_key, cfg.train.resume_from)
        # A classifier's config and logged model name its classes: the label map the data was prepared with.
        model = export_in_task(cfg, checkpoint, model_ref, storage.join(output, run_key, "model"),
                               tracker.target if cfg.tracking.log_model else None, label_names=data.label_names)
    # A run resumed at its last tick reported its final evaluation without a checkpoint, which Ray
    # Train does not keep: its rank 0 logged it.
    metrics = dict(result.metrics) if result.metrics else tracking.latest_metrics(tracker.target)
    return TrainOutcome(run_id=tracker.target.run_id, tracking_uri=tracker.target.uri, run_name=run_name,
                        metrics=metrics, model_dir=model.local_dir, model_location=model.location,
                        model_uri=model.model_uri, checkpoint=checkpoint, adapter_location=model.adapter_location,
                        adapter_uri=model.adapter_uri, run_page=tracking.run_page(tracker.target))

def fit(cfg: Config, model_ref: str, data: PreparedData, run, storage_name: str, storage_location: str,
        callbacks: list | None = None, marks: tuple[tuple[str, float], ...] = (), first_eval_dir: str | None = None):
    """Run the TorchTrainer, storing its run at `<storage_location>/<storage_name>` (a local path or a
    URI); `callbacks` are Ray Train callbacks (a sweep passes TuneReportCallback). `marks` are the
    caller's own start-up parts, `first_eval_dir` a sweep's shared tick-0 evaluations (`train.startup`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    storage_location = storage.resolve(storage_location)
    wait_for_workers(cfg)  # bounded, where Ray Train would wait for ever
    # No Ray Dataset: each rank reads its slice of every tick's global batch by sample id
    # (pipeline.train.source), so which samples train at a tick does not depend on the world size.
    plan = WorkerPlan(config=cfg, model_ref=model_ref, run=run, data=data,
                      run_dir=storage.join(storage_location, storage_name), first_eval_dir=first_eval_dir,
                      marks=(*marks, ("worker group", time.time())))
    # Ray takes a path inside a filesystem (a bucket's key, not a URI) plus the filesystem: ours, so
    # that Ray and this pipeline reach the same endpoint with the same settings.
    filesystem, storage_path = storage.filesystem(storage_location)
    trainer = TorchTrainer(
        functools.partial(train_worker, plan),
        scaling_config=ray.train.ScalingConfig(num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
                                               use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker, **t.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name=storage_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingFailed(describe_failure(error)) from error


def fit_in_process(cfg: Config, model_ref: str, data: PreparedData, run, storage_name: str, storage_location: str,
                   listener, marks: tuple = (), first_eval_dir: str | None = None) -> tuple[dict, str]:
    """`fit` for one CPU rank (`train.local.runs_in_process`), trained in this process: no Train
    controller or worker process to start. Checkpoints go where `fit` puts them; `listener(metrics,
    checkpoint location or None)` hears every report. Returns the last report's metrics and the final
    checkpoint's location."""
    from pipeline.train.local import train_in_process

    plan = WorkerPlan(config=cfg, model_ref=model_ref, run=run, data=data,
                      run_dir=storage.join(storage.resolve(storage_location), storage_name), marks=marks,
                      first_eval_dir=first_eval_dir)
    reporter = train_in_process(plan, listener, keep=cfg.train.keep_checkpoints)
    final = reporter.checkpoints[-1] if reporter.checkpoints else resumed_checkpoint(plan.run_dir, cfg.train.resume_from)
    return reporter.reports[-1], final


def stored_checkpoint(result, storage_location: str, storage_name: str, resume_from: str | None) -> str:
    """The location of a fit's final checkpoint: the last one Ray registered (it reports a path inside
    the storage filesystem), or the one the run resumed from when it trained no tick (`resumed_checkpoint`)."""
    storage_location = storage.resolve(storage_location)
    if result.checkpoint is None:
        return resumed_checkpoint(storage.join(storage_location, storage_name), resume_from)
    return storage.to_location(storage_location, result.checkpoint.path)


def resumed_checkpoint(run_dir: str, resume_from: str | None) -> str:
    """The checkpoint a run's ranks resumed from, chosen as they chose it (`train.rank`): a run resumed
    at train.max_ticks trains nothing and writes none, and this one holds its final weights."""
    location, _ = resume_point(run_dir, resume_from, verify_sizes_only)
    if location is None:
        raise CheckpointError(f"{run_dir}: the run ended without writing a checkpoint, and it resumed from none")
    return location

