"""The streaming JSONL reader on real files, without Ray: a line belongs to the piece it starts in,
whatever the cut, and an oversized line streams by without being held."""

import json

import pytest

from pipeline.config import DataConfig
from pipeline.data import parse
from pipeline.data.parse import PieceReader


def records(path, cuts, max_bytes=1 << 20):
    """Every (line number in its file, text, reason) the pieces [cuts[i], cuts[i+1]) yield, in order."""
    reader = PieceReader(DataConfig(path=str(path), format="jsonl", max_document_bytes=max_bytes))
    size = path.stat().st_size
    found, lines_before = [], 0
    for start, end in zip(cuts, [*cuts[1:], size]):
        for record in reader.records(str(path), path.name, size, start, end):
            found.append((lines_before + record.index, record.text, record.bad))
        lines_before += reader.lines
    return found


@pytest.mark.parametrize("ending", ["\n", ""])  # with and without a newline after the last line
def test_every_cut_gives_each_line_once_with_its_number(tmp_path, monkeypatch, ending):
    monkeypatch.setattr(parse, "READ_BLOCK", 7)  # lines cross read blocks as well as pieces
    texts = ["alpha", "a longer second line of text", "", "x", "the fifth, after a blank line"]
    body = "\n".join(json.dumps({"text": t}) if t else "" for t in texts) + ending
    path = tmp_path / "a.jsonl"
    path.write_text(body)
    expected = [(number, text, "") for number, text in enumerate(texts, start=1) if text]
    assert records(path, [0]) == expected
    for cut in range(1, len(body)):
        assert records(path, [0, cut]) == expected, f"cut at byte {cut}"
    for first in range(1, len(body) - 1, 3):
        assert records(path, [0, first, first + 2]) == expected, f"cuts at {first}, {first + 2}"


def test_an_oversized_line_is_reported_with_its_size_and_the_next_line_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr(parse, "READ_BLOCK", 64)
    big = json.dumps({"text": "y" * 5000})
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"text": "before"}) + "\n" + big + "\n" + json.dumps({"text": "after"}) + "\n")
    found = records(path, [0, 100, 3000], max_bytes=1000)
    assert found == [(1, "before", ""), (2, "", "too_large"), (3, "after", "")]
