"""Bad corpus records: what counts as one, and the `data.on_bad_record` policy (skip and count, or fail).

Readers never raise on a bad record inside a Ray task (that would surface as a worker traceback);
each chunk task counts its bad records and returns the first of each reason, and the driver, which
sees the chunks in corpus order, adds them up or stops at the first one, naming its file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError

REASONS = {
    "unreadable_file": "file cannot be read",
    "invalid_json": "not valid JSON",
    "not_utf8": "not valid UTF-8",
    "empty": "empty document",
    "missing_field": "a field it needs is missing",
    "too_large": "larger than data.max_document_bytes",
    # the example formats (chat, instruction, prompt_completion)
    "unknown_role": "a message role other than system, user or assistant",
    "not_text": "content that is not a string",
    "empty_response": "an empty response",
    "no_final_response": "a conversation that does not end with an assistant turn",
    "template_error": "the chat template refused it",
    "too_long": "more tokens than data.seq_len",
    "no_response_left": "no response token left once cut to data.seq_len",
    # the labelled formats (labelled_text, tagged_tokens)
    "bad_label": "a label that is neither a string nor an int",
    "unknown_label": "a label the training split does not have (or an id data.label_names has no name for)",
    "length_mismatch": "a different number of tokens and tags",
}


class BadRecordError(ConfigError):
    """data.on_bad_record=fail and a bad record was found; the message names its file and line."""


class NoUsableDocuments(ConfigError):
    """Every record of the corpus was bad (or the corpus held none): nothing to train on."""


@dataclass
class BadRecords:
    """Counts by reason and the first example of each; raises at the first one under `fail`."""

    policy: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        if self.policy == "fail":
            raise BadRecordError(f"data: {_description(reason, where, detail)}; set data.on_bad_record=skip to "
                                 f"skip and count such records")
        self.merge(reason, 1, where, detail)

    def merge(self, reason: str, count: int, where: str, detail: str = "") -> None:
        """Count `count` records of `reason`, `where` being the first of them."""
        self.counts[reason] = self.counts.get(reason, 0) + count
        self.examples.setdefault(reason, _description(reason, where, detail))

    def summary(self) -> str:
        return describe(self.counts, self.examples)


def _description(reason: str, where: str, detail: str) -> str:
    return f"{where}: {REASONS[reason]}" + (f" ({detail})" if detail else "")


def describe(counts: dict[str, int], examples: dict[str, str]) -> str:
    if not counts:
        return ""
    by_reason = ", ".join(f"{reason} {count:,}" for reason, count in sorted(counts.items()))
    first = "; ".join(examples[reason] for reason in sorted(examples))
    total = sum(counts.values())
    return f"skipped {total:,} bad record{'s' if total != 1 else ''}: {by_reason} (first of each: {first})"
