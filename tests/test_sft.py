"""Instruction and chat fine-tuning without Ray: rendering and response-only labels, document
packing and its reader, and a packed batch's loss and gradients against its examples run one by one."""

import itertools

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.blocks import IGNORE, BlockReader, PackPlan, TokenFile
from pipeline.data.examples import BadExample, ExampleEncoder, Renderer
from pipeline.data.prepare import checked_tokenizer
from pipeline.data.tokenize import backend_tokenizer

from conftest import tiny_config

# ChatML, ending each turn with the tiny tokenizer's EOS (so generation stops after an answer).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|endoftext|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who wrote the message of 1861?"},
    {"role": "assistant", "content": "Abraham Lincoln."},
    {"role": "user", "content": "In which month?"},
    {"role": "assistant", "content": "December."}]}


def sft_data(tmp, *overrides):
    return tiny_config(tmp, "data.format=chat", f"data.chat_template={CHATML!r}", "data.seq_len=256", *overrides).data


def encoder_for(data, model_ref, tmp):
    from tokenizers import Tokenizer

    tokenizer = checked_tokenizer(data, backend_tokenizer(model_ref, str(tmp / "tokenizer.json"))[0], model_ref)
    return Renderer(data, tokenizer.text), ExampleEncoder(Tokenizer.from_str(tokenizer.backend), data, tokenizer.text)


def runs(mask: np.ndarray) -> list[tuple[bool, slice]]:
    """Consecutive stretches of equal mask values."""
    edges = [0, *(np.flatnonzero(np.diff(mask.astype(int))) + 1), len(mask)]
    return [(bool(mask[a]), slice(a, b)) for a, b in itertools.pairwise(edges)]


def test_a_two_turn_chat_trains_exactly_its_assistant_turns(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    renderer, encoder = encoder_for(sft_data(tmp_path), tiny_model, tmp_path)
    rendered = renderer.render(CONVERSATION)
    example = encoder.encode([rendered])[0]
    hf = AutoTokenizer.from_pretrained(tiny_model)
    # The ids are the whole rendered text's, as at inference; the template put no extra BOS in.
    assert example.input_ids.tolist() == hf(rendered.text, add_special_tokens=False).input_ids
    target = example.labels != IGNORE
    assert (example.labels[target] == example.input_ids[target]).all()
    pieces = [(trained, hf.decode(example.input_ids[where])) for trained, where in runs(target)]
    assert pieces == [
        (False, "<|im_start|>system\nAnswer briefly.<|endoftext|>\n<|im_start|>user\nWho wrote the message of "
                "1861?<|endoftext|>\n<|im_start|>assistant\n"),
        (True, "Abraham Lincoln.<|endoftext|>\n"),
        (False, "<|im_start|>user\nIn which month?<|endoftext|>\n<|im_start|>assistant\n"),
        (True, "December.<|endoftext|>\n")]
    assert rendered.reference == "December." and rendered.prompt.endswith("In which month?<|endoftext|>\n"
                                                                          "<|im_start|>assistant\n")
    # train_on_prompt: every token but the first (nothing in its block predicts it) is a target.
    _, everything = encoder_for(sft_data(tmp_path, "data.train_on_prompt=true"), tiny_model, tmp_path)
    labels = everything.encode([rendered])[0].labels
    assert labels[0] == IGNORE and (labels[1:] != IGNORE).all()


def test_instruction_and_prompt_completion_end_with_one_eos(tiny_model, tmp_path):
    renderer, encoder = encoder_for(sft_data(tmp_path, "data.format=instruction"), tiny_model, tmp_path)
    rendered = renderer.render({"instruction": "Name the author.", "input": "The 1861 message.", "output": "Lincoln."})
    assert rendered.text == ("### Instruction:\nName the author.\n\n### Input:\nThe 1861 message.\n\n### Response:\n"
                             "Lincoln.<|endoftext|>")
    assert renderer.render({"instruction": "Name one.", "output": "Lincoln."}).text.count("### Input") == 0
    example = encoder.encode([rendered])[0]
    eos = encoder.tokens.eos_token_id
    assert example.input_ids[-1] == eos and (example.input_ids == eos).sum() == 1 and example.labels[-1] == eos
    completion, _ = encoder_for(sft_data(tmp_path, "data.format=prompt_completion"), tiny_model, tmp_path)
    assert completion.render({"prompt": "Q: who? A:", "completion": " Lincoln"}).responses == [(10, 18 + 13)]


def test_bos_is_added_once_when_the_template_has_none(tiny_model, tmp_path):
    import dataclasses

    renderer, encoder = encoder_for(sft_data(tmp_path, "data.format=prompt_completion"), tiny_model, tmp_path)
    adds = ExampleEncoder(encoder.backend, encoder.cfg, dataclasses.replace(encoder.tokens, adds_bos=True))
    bos = adds.tokens.bos_token_id
    plain = adds.encode([renderer.render({"prompt": "Who?", "completion": " Lincoln"})])[0]
    started = adds.encode([renderer.render({"prompt": "<|endoftext|>Who?", "completion": " Lincoln"})])[0]
    assert plain.input_ids[0] == bos and plain.input_ids[1] != bos
    assert started.input_ids[0] == bos and started.input_ids[1] != bos  # the prompt's own BOS, not a second


@pytest.mark.parametrize("fields,reason", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hello"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "empty_response"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "Bye"}]}, "no_final_response"),
    ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}]}, "not_text"),
    ({"conversation": []}, "missing_field"),
])
def test_bad_conversations_are_named_by_kind(tiny_model, tmp_path, fields, reason):
    renderer, _ = encoder_for(sft_data(tmp_path), tiny_model, tmp_path)
    with pytest.raises(BadExample) as caught:
        renderer.render(fields)
    assert caught.value.reason == reason


def test_a_long_example_is_skipped_or_cut_and_never_trained_without_a_response(tiny_model, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "Yes."}]}
    renderer, skip = encoder_for(sft_data(tmp_path), tiny_model, tmp_path)
    assert skip.encode([renderer.render(long_prompt)])[0].reason == "too_long"
    _, cut = encoder_for(sft_data(tmp_path, "data.too_long=truncate"), tiny_model, tmp_path)
    assert cut.encode([renderer.render(long_prompt)])[0].reason == "no_response_left"
    long_answer = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "word " * 400}]}
    kept = cut.encode([renderer.render(long_answer)])[0]
    assert len(kept.input_ids) == 256 and (kept.labels != IGNORE).sum() > 20


def test_a_chat_format_without_a_template_is_a_config_error(tiny_model, tmp_path):
    data = tiny_config(tmp_path, "data.format=chat").data
    with pytest.raises(ConfigError, match=r"data.chat_template: the tokenizer of .* has no chat template; set one"):
        encoder_for(data, tiny_model, tmp_path)
    with pytest.raises(ConfigError, match=r"data.chat_template: the template does not compile"):
        encoder_for(sft_data(tmp_path, "data.chat_template='{% for m in messages %}'"), tiny_model, tmp_path)
    with pytest.raises(ConfigError, match=r"data.packing: 'document' is for the example formats"):
        tiny_config(tmp_path, "data.packing=document")


def write_examples(tmp, examples: list[list[int]]) -> list[TokenFile]:
    pairs = np.concatenate([np.stack([np.asarray(e), np.asarray(e) + 100], axis=1).reshape(-1) for e in examples])
    path = tmp / "examples.bin"
    path.write_bytes(pairs.astype("<i4").tobytes())
    return [TokenFile(str(path), sum(map(len, examples)), path.stat().st_size, "")]


def test_document_packing_keeps_examples_whole_and_restarts_positions(tmp_path):
    examples = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]
    plan = PackPlan.next_fit(np.array([len(e) for e in examples]), 8)
    assert plan.first.tolist() == [0, 2, 3, 4]  # [5 + 3], [4], [6]: the next example would not fit
    assert PackPlan.from_bytes(plan.to_bytes()).first.tolist() == plan.first.tolist()
    reader = BlockReader(write_examples(tmp_path, examples), 8, labelled=True, plan=plan, pad_id=0)
    blocks = reader.read_blocks([0, 1])
    assert blocks.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert blocks.labels.tolist() == [[101, 102, 103, 104, 105, 106, 107, 108], [109, 110, 111, 112] + [IGNORE] * 4]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    one_each = PackPlan.next_fit(np.array([len(e) for e in examples]), 8, one_per_block=True)
    assert one_each.blocks == 4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradients_of_its_examples_one_by_one(tiny_model, attention):
    from pipeline.models import load_causal_lm, patch_norms

    torch.manual_seed(0)
    model = load_causal_lm(tiny_model, attn_implementation=attention)
    patch_norms(model, backend="torch")
    model.config.use_cache = False
    lengths, seq_len = [9, 14, 6], 32
    generator = torch.Generator().manual_seed(3)
    examples = [torch.randint(3, 500, (n,), generator=generator) for n in lengths]
    labels = []
    for ids in examples:  # a prompt (the first third) that is not trained on, as the encoder labels it
        label = ids.clone()
        label[: max(1, len(ids) // 3)] = IGNORE
        labels.append(label)
    targets = sum(int((label[1:] != IGNORE).sum()) for label in labels)

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    pad = seq_len - sum(lengths)
    packed_ids = torch.cat([*examples, torch.zeros(pad, dtype=torch.long)])[None]
    packed_labels = torch.cat([*labels, torch.full((pad,), IGNORE)])[None]
    positions = torch.cat([torch.arange(n) for n in [*lengths, pad]])[None]
    summed = torch.tensor(float(targets))
    packed = model(input_ids=packed_ids, labels=packed_labels, position_ids=positions, num_items_in_batch=summed).loss
    packed_grads = gradients(packed)
    alone = sum(model(input_ids=ids[None], labels=label[None], num_items_in_batch=summed).loss
                for ids, label in zip(examples, labels))
    alone_grads = gradients(alone)
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    for name, grad in packed_grads.items():
        scale = alone_grads[name].norm().item()
        assert (grad - alone_grads[name]).norm().item() <= 1e-5 * max(scale, 1e-6), name
    # The same tokens without restarting positions attend across examples: a different loss.
    crossing = model(input_ids=packed_ids, labels=packed_labels, num_items_in_batch=summed).loss
    assert abs(crossing.item() - alone.item()) > 1e-3


def test_chat_records_read_the_same_from_jsonl_parquet_and_arrow(tiny_model, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.parse import PieceReader

    rows = [CONVERSATION, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "chat.parquet")
    with pa.OSFile(str(tmp_path / "chat.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data = sft_data(tmp_path)
    renderer, _ = encoder_for(data, tiny_model, tmp_path)
    texts = {}
    for name in ("chat.jsonl", "chat.parquet", "chat.arrow"):
        path = tmp_path / name
        records = PieceReader(data).records(str(path), name, path.stat().st_size, 0, path.stat().st_size)
        texts[name] = [renderer.render(r.fields).text for r in records]
    assert len(texts["chat.jsonl"]) == 2 and texts["chat.jsonl"] == texts["chat.parquet"] == texts["chat.arrow"]


def test_naive_packing_keeps_the_labels_and_lets_positions_run_on(tmp_path):
    examples = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    reader = BlockReader(write_examples(tmp_path, examples), 4, labelled=True)
    blocks = reader.read_blocks([0, 2])
    assert blocks.input_ids.tolist() == [[1, 2, 3, 4], [9, 10, 11, 12]]
    assert blocks.labels.tolist() == [[101, 102, 103, 104], [109, 110, 111, 112]]
    assert blocks.position_ids is None  # 0..L-1: attention crosses the examples of a block
