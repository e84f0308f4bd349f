"""Classification end to end on the tiny encoder (a 2-layer BERT built from config, its WordPiece
tokenizer trained on the 1790s speeches): for each task a labelled corpus written as JSON lines, a real
2-worker run (Ray Train, DeepSpeed ZeRO-2, the fused LayerNorms with noise, MLflow) whose logged model
predicts class names, then the same run as one rank in this process (the same losses and metrics),
resumed from a checkpoint (the same again), and without noise or with NEFTune's (other losses); and a
real sweep of the sequence classifier on macro-F1.

The corpora are learnable and the tests can fail: a text's class is the one keyword it holds among
filler words, a word's tag is fixed by the word (names are people, places are places), and the classes
are unbalanced, so the trained model has to beat always answering the majority class."""

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.data import prepare
from pipeline.locations import location_overrides
from pipeline.tracking import RunTarget, load_pyfunc
from pipeline.tracking.store import client_for
from pipeline.tracking.sweeps import TRIAL_TAG, child_runs
from pipeline.train import run_training
from pipeline.train.local import train_in_process
from pipeline.train.rank import WorkerPlan
from pipeline.tune import run_sweep

from conftest import REPO, SHARED_CACHES, tiny_config

pytestmark = pytest.mark.slow

SWEEP_YAML = REPO / "configs" / "sweep-tiny.yaml"
TICKS, EVAL_EVERY, GLOBAL_BATCH = 30, 10, 16
EVAL_TICKS = [0, 10, 20, 30]
ENCODER = ("model.architecture={model_type: bert, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
           "num_attention_heads: 4, max_position_embeddings: 64, hidden_dropout_prob: 0.0, "
           "attention_probs_dropout_prob: 0.0}")  # no dropout: it draws per rank, unlike the noise
FILLER = ["the", "people", "of", "this", "nation", "and", "our", "government", "will", "consider", "every", "measure",
          "with", "great", "care", "for", "peace", "public", "service", "in", "congress", "during", "year", "which",
          "states", "have", "made"]
KEYWORDS = {"farm": "agriculture", "navy": "ships", "court": "judges"}  # the class of a text: its keyword
SHARES = {"farm": 0.5, "navy": 0.3, "court": 0.2}  # the majority class is half of the examples
FIRST, LAST = ["john", "george", "thomas", "james"], ["adams", "washington", "jefferson", "madison"]
PLACES = ["boston", "virginia", "france", "spain"]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def sequence_records(count: int, rng: random.Random) -> list[dict]:
    records = []
    for label in rng.choices(list(SHARES), weights=list(SHARES.values()), k=count):
        words = rng.sample(FILLER, rng.randint(5, 9))
        words.insert(rng.randint(0, len(words)), KEYWORDS[label])
        records.append({"text": " ".join(words), "label": label})
    return records


def token_records(count: int, rng: random.Random) -> list[dict]:
    records = []
    for _ in range(count):
        words = rng.sample(FILLER, rng.randint(4, 8))
        tags = ["O"] * len(words)
        at = rng.randint(0, len(words))
        words[at:at] = [rng.choice(FIRST), rng.choice(LAST)]
        tags[at:at] = ["B-PER", "I-PER"]
        if rng.random() < 0.6:
            at = rng.randint(0, len(words))
            words.insert(at, rng.choice(PLACES))
            tags.insert(at, "B-LOC")
        records.append({"tokens": words, "ner_tags": tags})
    return records


TASKS = {"sequence_classification": ("labelled_text", sequence_records),
         "token_classification": ("tagged_tokens", token_records)}


def write_corpus(tmp: Path, task: str, seed: int) -> Path:
    """The task's learnable corpus: 320 training records in file 1, 64 eval records in file 2."""
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = random.Random(seed)
    write_jsonl(corpus / "1-train.jsonl", TASKS[task][1](320, rng))
    write_jsonl(corpus / "2-eval.jsonl", TASKS[task][1](64, rng))
    return corpus


def task_overrides(corpus: Path, task: str, workers: int) -> list[str]:
    return [f"model.task={task}", ENCODER, f"data.format={TASKS[task][0]}", f"data.path={corpus}", "data.seq_len=32",
            "data.split.eval_from=2", f"train.num_workers={workers}", f"train.micro_batch_size={GLOBAL_BATCH // workers}",
            f"train.max_ticks={TICKS}", f"train.eval_every={EVAL_EVERY}", "train.eval_batches=4", "train.lr=3e-3",
            "train.warmup_ticks=1", "train.zero_stage=2", "noise.sigma=0.1", "tracking.log_model=false"]


def config(tmp: Path, corpus: Path, task: str, workers: int, *overrides: str):
    return tiny_config(tmp, *task_overrides(corpus, task, workers), *overrides)


@pytest.fixture(scope="module", params=list(TASKS))
def trained(request, ray_session, tmp_path_factory):
    """(task, corpus, the 2-worker run): one run per task, shared by the tests below."""
    task = request.param
    tmp = tmp_path_factory.mktemp(task)
    corpus = write_corpus(tmp, task, seed=0)
    return task, corpus, run_training(config(tmp, corpus, task, 2, "tracking.log_model=true"))


def in_process(tmp: Path, corpus: Path, task: str, *overrides: str):
    """The run as one rank in this process: its reporter (every evaluation's report, the checkpoints)."""
    cfg = config(tmp, corpus, task, 1, *overrides)
    model_ref, data = prepare(cfg)
    return train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / "run")))


def by_tick(run) -> dict[int, dict]:
    """A run's reports by tick."""
    return {int(report["tick"]): report for report in run.reports}


@pytest.fixture(scope="module")
def one_rank(trained, tmp_path_factory):
    """The same run as one rank in this process, with a checkpoint at tick 20."""
    task, corpus, _ = trained
    return in_process(tmp_path_factory.mktemp(f"{task}-one"), corpus, task, "train.checkpoint_every=20")


@pytest.fixture(scope="module")
def quiet(trained, tmp_path_factory):
    """The same run as one rank without noise."""
    task, corpus, _ = trained
    return by_tick(in_process(tmp_path_factory.mktemp(f"{task}-quiet"), corpus, task, "noise.sigma=0"))


def history(outcome, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, name)}


def test_the_metrics_are_logged_at_every_eval_and_training_beats_the_majority_class(trained):
    task, _, outcome = trained
    names = ["eval_loss", "eval_accuracy", "eval_f1", "eval_majority_accuracy"]
    if task == "token_classification":
        names += ["eval_precision", "eval_recall"]
    logged = {name: history(outcome, name) for name in names}
    for name in names:
        assert sorted(logged[name]) == EVAL_TICKS, name
    assert not history(outcome, "eval_perplexity")  # meaningless for a classifier
    m = outcome.metrics
    print(f"{task}: accuracy {m['eval_accuracy_start']:.4f} -> {m['eval_accuracy']:.4f}, F1 {m['eval_f1_start']:.4f} "
          f"-> {m['eval_f1']:.4f}, majority class {m['eval_majority_accuracy']:.4f}, eval loss "
          f"{m['eval_loss_start']:.4f} -> {m['eval_loss']:.4f}")
    majority = m["eval_majority_accuracy"]
    assert 0.4 < majority < 0.8  # unbalanced, but far from one class
    assert m["eval_accuracy"] > majority + 0.5 * (1 - majority), m  # half the way from the baseline to perfect
    assert m["eval_f1"] > m["eval_f1_start"] + 0.3 and m["eval_loss"] < 0.5 * m["eval_loss_start"], m
    summary = outcome.summary()
    assert f"after {m['eval_accuracy']:.4f}  (majority class {majority:.4f})" in summary
    assert "perplexity" not in summary and f"model: {outcome.model_location}" in summary


def test_the_logged_model_predicts_class_names_as_well_as_the_run_measured(trained):
    """The 2-worker run's MLflow model, loaded as pyfunc, on the eval texts: class names, and about
    the accuracy the run's last eval measured (a token's tag: its word's first sub-token)."""
    task, corpus, outcome = trained
    records = [json.loads(line) for line in (corpus / "2-eval.jsonl").read_text().splitlines()]
    model = load_pyfunc(outcome.model_uri, outcome.tracking_uri)
    if task == "sequence_classification":
        predicted = model.predict([r["text"] for r in records])["label"].tolist()
        expected = [r["label"] for r in records]
    else:
        tokenizer = AutoTokenizer.from_pretrained(outcome.model_dir)
        predicted, expected = [], []
        for record, tags in zip(records, model.predict([" ".join(r["tokens"]) for r in records]), strict=True):
            tags = tags.split(",")
            firsts = [0]
            for word in record["tokens"][:-1]:
                firsts.append(firsts[-1] + len(tokenizer.tokenize(word)))
            assert len(tags) == firsts[-1] + len(tokenizer.tokenize(record["tokens"][-1])), record
            predicted += [tags[i] for i in firsts]
            expected += record["ner_tags"]
    assert set(predicted) <= set(expected) | {"O"}, set(predicted)  # names, not ids
    accuracy = sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)
    print(f"{task}: the logged model's accuracy on the eval texts {accuracy:.4f}")
    assert accuracy > outcome.metrics["eval_majority_accuracy"] + 0.1 and accuracy > outcome.metrics["eval_accuracy"] - 0.1


def test_one_rank_in_this_process_trains_what_two_ray_workers_train(trained, one_rank):
    task, _, outcome = trained
    assert sorted(by_tick(one_rank)) == EVAL_TICKS[1:]  # every evaluation is reported
    losses = history(outcome, "loss")
    print(f"{task}: 1 vs 2 workers, largest relative loss difference "
          f"{max(abs(r['loss'] - losses[t]) / losses[t] for t, r in by_tick(one_rank).items()):.2e}")
    for tick, report in by_tick(one_rank).items():
        assert report["loss"] == pytest.approx(losses[tick], rel=1e-4), (task, tick)
        for name in ("eval_loss", "eval_accuracy", "eval_f1"):
            assert report[name] == pytest.approx(history(outcome, name)[tick], rel=1e-4, abs=1e-6), (task, tick, name)


def test_a_resumed_classifier_continues_the_same_run(trained, one_rank, tmp_path):
    task, corpus, _ = trained
    at_twenty = one_rank.checkpoints[0]
    assert at_twenty.endswith("checkpoint_000020"), one_rank.checkpoints
    resumed, whole = by_tick(in_process(tmp_path, corpus, task, f"train.resume_from={at_twenty}")), by_tick(one_rank)
    assert sorted(resumed) == [30]
    for name in ("loss", "eval_loss", "eval_accuracy", "eval_f1"):
        assert resumed[30][name] == pytest.approx(whole[30][name], rel=1e-6, abs=1e-9), name
    # What the sweep's report and the summary call "before": the first eval, kept in the checkpoint.
    assert resumed[30]["eval_accuracy_start"] == whole[30]["eval_accuracy_start"]


@pytest.mark.parametrize("site", ["norm", "embedding"])
def test_either_noise_reaches_the_classifiers_loss(trained, one_rank, quiet, tmp_path, site):
    """The fused norms' noise (the runs above, σ = 0.1) and NEFTune's on the input embedding (α = 5)
    each change the losses of the same run without noise."""
    task, corpus, _ = trained
    noisy = by_tick(one_rank if site == "norm" else
                    in_process(tmp_path / site, corpus, task, "noise.site=embedding", "noise.sigma=0",
                               "noise.neftune_alpha=5"))
    differences = [abs(noisy[t]["loss"] - quiet[t]["loss"]) / quiet[t]["loss"] for t in sorted(quiet)]
    print(f"{task}, noise at the {site}: relative loss differences from no noise {differences}")
    assert min(differences) > 1e-4, differences


def test_a_sweep_on_macro_f1_picks_the_trial_with_the_highest_f1(ray_session, tmp_path):
    """A real sweep of the tiny sequence classifier on `eval_f1` (mode max, from the name): two trials
    one at a time, a quick and a slow learning rate; the best trial is the one whose last evaluation scored the
    highest F1, and the model it registers predicts class names."""
    corpus = write_corpus(tmp_path, "sequence_classification", seed=1)
    space = 'sweep.space={"train.lr": {"type": "choice", "values": [0.003, 0.00001]}}'
    cfg = load_config(SWEEP_YAML, [*location_overrides(tmp_path), *SHARED_CACHES,
                                   *task_overrides(corpus, "sequence_classification", 1), space, "sweep.metric=eval_f1",
                                   "sweep.search=random", "sweep.seed=3", "sweep.num_samples=2", "sweep.max_concurrent_trials=1",
                                   "sweep.confirm.seeds=0", "sweep.register_model=classify-sweep-best",
                                   "tracking.log_model=true"])
    assert cfg.sweep.metric_mode == "max"
    outcome = run_sweep(cfg)
    client = client_for(cfg.tracking.uri)
    trials = {run.info.run_id: run for run in child_runs(RunTarget(cfg.tracking.uri, outcome.parent_run_id))}
    final_f1 = {run_id: max(client.get_metric_history(run_id, "eval_f1"), key=lambda m: m.step).value
                for run_id in trials}
    print(f"sweep on eval_f1: the trials' lr and final F1 "
          f"{[(trials[r].data.params['train.lr'], f) for r, f in final_f1.items()]}")
    assert {trials[r].data.params["train.lr"] for r in trials} == {"0.003", "1e-05"}  # the seed draws both
    assert len(set(final_f1.values())) == 2, final_f1
    # A trial's span: its run's start to its last logged tick (the best run's end moves when its model is logged).
    first, second = sorted((run.info.start_time, max(m.timestamp for m in client.get_metric_history(run_id, "loss")))
                           for run_id, run in trials.items())
    assert first[1] <= second[0], (first, second)  # one trial at a time, as asked, under random search too
    parent = client.get_run(outcome.parent_run_id)
    best = max(final_f1, key=final_f1.get)
    assert parent.data.metrics["best_eval_f1"] == final_f1[best]
    assert trials[best].data.tags[TRIAL_TAG] == parent.data.params["best.trial_id"]
    assert outcome.registered == "models:/classify-sweep-best/1"
    predicted = load_pyfunc(outcome.registered, cfg.tracking.uri).predict(["the navy will consider every measure"])
    assert predicted["label"].tolist()[0] in SHARES  # a class name
