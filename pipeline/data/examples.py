"""Prompt/response examples -> token ids and labels, in the tokenizer actors.

A record is rendered to text first: the chat template (chat), the prompt template (instruction), or
prompt + completion, plus the character spans of its responses. The whole text is then encoded once,
so its ids are exactly what the same text gives at inference, and a token is a target when it
starts inside a response span. Chat spans come from rendering each conversation's prefixes: a turn's
response is what `messages[:i+1]` adds to `messages[:i]` with the generation prompt, so the
template's own end-of-turn tokens are trained (the model learns to stop) and no template needs
special markers. Labels are -100 off the targets and on an example's first token (nothing before it
in its block belongs to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.blocks import IGNORE
from pipeline.data.parse import FileProblem

ROLES = ("system", "user", "assistant")


class BadExample(Exception):
    """A record that cannot be trained on; `reason` is one of bad_records.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class TokenizerText:
    """What rendering needs from the tokenizer besides its vocabulary (picklable, for the actors)."""

    chat_template: str | None  # data.chat_template, else the tokenizer's own
    bos_token: str | None
    bos_token_id: int | None
    adds_bos: bool  # the tokenizer puts BOS before a text by itself (Llama, Mistral)
    eos_token: str | None  # None only for an encoder's tokenizer (BERT's), read by the labelled formats
    eos_token_id: int | None
    pad_token_id: int | None = None


@dataclass(frozen=True)
class Rendered:
    text: str
    responses: list[tuple[int, int]]  # character spans of the trained parts
    prompt: str  # what comes before the last response (for sample generations)
    reference: str  # the last response


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE off the targets


def compile_chat_template(source: str):
    """The template in the environment transformers renders chat templates in (sandboxed Jinja with
    trim_blocks, lstrip_blocks, loop controls, tojson and raise_exception)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return environment.from_string(source)


class Renderer:
    def __init__(self, cfg: DataConfig, text: TokenizerText):
        self.cfg, self.tokens = cfg, text
        self.template = compile_chat_template(text.chat_template) if cfg.format == "chat" else None

    def render(self, fields: dict) -> Rendered:
        if self.cfg.format == "chat":
            return self._chat(self._messages(fields))
        if self.cfg.format == "instruction":
            names = self.cfg.fields
            extra = _text(fields, names.input, required=False)
            prompt = self.cfg.prompt_template.format(instruction=_text(fields, names.instruction),
                                                     input=f"### Input:\n{extra}\n\n" if extra.strip() else "")
            return self._single(prompt, _response(fields, names.output))
        names = self.cfg.fields
        return self._single(_text(fields, names.prompt, required=True, empty_ok=True),
                            _response(fields, names.completion))

    def _single(self, prompt: str, response: str) -> Rendered:
        text = prompt + response + self.tokens.eos_token  # EOS ends the response: the model learns to stop
        return Rendered(text, [(len(prompt), len(text))], prompt, response)

    def _messages(self, fields: dict) -> list[dict]:
        messages = fields.get(self.cfg.fields.messages)
        if not isinstance(messages, list) or not messages:
            raise BadExample("missing_field", f"no list field '{self.cfg.fields.messages}'")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise BadExample("unknown_role", f"role {role!r}")
            if not isinstance(message.get("content"), str):
                raise BadExample("not_text", f"{message['role']} content is {type(message.get('content')).__name__}")
            if message["role"] == "assistant" and not message["content"].strip():
                raise BadExample("empty_response", "an assistant turn with no content")
        if messages[-1]["role"] != "assistant" and not self.cfg.train_on_prompt:
            raise BadExample("no_final_response", f"the last turn is {messages[-1]['role']}'s")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def _chat(self, messages: list[dict]) -> Rendered:
        text = self._render(messages, generation_prompt=False)
        responses, before = [], ""
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:turn], generation_prompt=True)
            through = text if turn == len(messages) - 1 else self._render(messages[:turn + 1], generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise FileProblem("data.chat_template: the template does not render a conversation's first turns as "
                                  "a prefix of the whole, so the responses cannot be located (a template that rewrites "
                                  "earlier turns)")
            responses.append((len(before), len(through)))
        reference = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        return Rendered(text, responses, before, reference)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=generation_prompt,
                                        bos_token=self.tokens.bos_token or "", eos_token=self.tokens.eos_token)
        except TemplateError as error:
            raise BadExample("template_error", str(error)) from None


def _text(fields: dict, name: str, required: bool = True, empty_ok: bool = False) -> str:
    value = fields.get(name)
    if value is None and not required:
        return ""
    if value is None:
        raise BadExample("missing_field", f"no field '{name}'")
    if not isinstance(value, str):
        raise BadExample("not_text", f"'{name}' is {type(value).__name__}")
    if not value.strip() and not empty_ok:
        raise BadExample("empty", f"'{name}' is empty")
    return value


def _response(fields: dict, name: str) -> str:
    response = _text(fields, name, empty_ok=True)
    if not response.strip():
        raise BadExample("empty_response", f"'{name}' is empty")
    return response


class ExampleEncoder:
    """Rendered examples -> `Example`s, or `BadExample`s for those that cannot fit a block."""

    def __init__(self, backend, cfg: DataConfig, text: TokenizerText):
        self.backend, self.cfg, self.tokens = backend, cfg, text

    def encode(self, rendered: list[Rendered]) -> list[Example | BadExample]:
        encodings = self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
        return [self._example(r, e.ids, e.offsets) for r, e in zip(rendered, encodings)]

    def _example(self, rendered: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> Example | BadExample:
        ids = np.asarray(ids, dtype=np.int32)
        starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
        target = np.zeros(len(ids), dtype=bool)
        for begin, end in rendered.responses:
            target |= (starts >= begin) & (starts < end)
        t = self.tokens
        if t.adds_bos and t.bos_token_id is not None and not (t.bos_token and rendered.text.startswith(t.bos_token)):
            ids, target = np.concatenate([[t.bos_token_id], ids]).astype(np.int32), np.concatenate([[False], target])
        if self.cfg.train_on_prompt:
            target[:] = True
        target[:1] = False  # nothing in the block before an example's first token belongs to it
        if len(ids) > self.cfg.seq_len:
            if self.cfg.too_long_mode == "skip":
                return BadExample("too_long", f"{len(ids)} tokens, data.seq_len is {self.cfg.seq_len}")
            ids, target = ids[:self.cfg.seq_len], target[:self.cfg.seq_len]
            if not target.any():
                return BadExample("no_response_left", f"cut to data.seq_len {self.cfg.seq_len}")
        return Example(ids, np.where(target, ids, IGNORE).astype(np.int32))
