"""Each format: the exact token ids and loss mask of a small example, built piece by piece here.

The tokenizer is the test model's (trained on Python's docs, like the tiny model's; it has no chat
template, so the chat format uses the built-in one). Expected ids are assembled from tokenizing
each piece on its own, and the targets are decoded back to text, so a shifted mask shows.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from fsdpqlora.config import compose_config, validate
from fsdpqlora.data import IGNORE_INDEX, TokenizedSet, generation_prompt_ids, make_format, prepare
from fsdpqlora.data.formats import BUILTIN_CHAT_TEMPLATE, alpaca_prompt
from fsdpqlora.data.sources import Source
from fsdpqlora.data.tokenize import tokenize_source
from fsdpqlora.errors import ConfigError, DataError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def pieces(tokenizer, *texts: str) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def encode(tokenizer, tmp_path, rows: list[dict], *overrides: str):
    """(input_ids, labels) of every example the rows give, through the real reader and tokenizer."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = compose_config([f"launch.cache_dir={tmp_path}", *overrides])
    validate(cfg)
    dataset, stats = tokenize_source(Source(str(path), files=(path,)), make_format(cfg, tokenizer), tokenizer, cfg, show_progress=False)
    return [(dataset.input_ids(i).tolist(), dataset.labels(i).tolist()) for i in range(len(dataset))], stats


def masked(ids: list[int]) -> list[int]:
    return [IGNORE_INDEX] * len(ids)


def test_tokenizer_has_no_chat_template(tokenizer):
    assert tokenizer.chat_template is None  # so the chat tests below use the built-in template


def test_alpaca(tokenizer, tmp_path):
    row = {"instruction": "Name the statement.", "input": "x = 1", "output": "assert"}
    [(ids, labels)], _ = encode(tokenizer, tmp_path, [row])
    prompt, response = pieces(tokenizer, alpaca_prompt("Name the statement.", "x = 1"), "assert")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids == [bos] + prompt + response + [eos]
    assert labels == masked([bos] + prompt) + response + [eos]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "assert</s>"
    assert "### Input:\nx = 1\n\n### Response:\n" in alpaca_prompt("Name the statement.", "x = 1")


def test_alpaca_input_is_optional_and_may_be_null(tokenizer, tmp_path):
    rows = [{"instruction": "Go.", "output": "ok"}, {"instruction": "Go.", "input": None, "output": "ok"}, {"instruction": "Go.", "input": "", "output": "ok"}]
    examples, _ = encode(tokenizer, tmp_path, rows)
    assert examples[0] == examples[1] == examples[2]
    prompt, output = pieces(tokenizer, alpaca_prompt("Go."), "ok")
    assert examples[0][0] == [tokenizer.bos_token_id] + prompt + output + [tokenizer.eos_token_id]


def test_train_on_prompt_trains_on_everything_but_the_first_token(tokenizer, tmp_path):
    row = {"instruction": "Name the statement.", "output": "assert"}
    [(ids, labels)], _ = encode(tokenizer, tmp_path, [row], "data.train_on_prompt=true")
    assert labels == [IGNORE_INDEX] + ids[1:]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def test_chat_with_the_builtin_template_trains_on_assistant_turns_only(tokenizer, tmp_path):
    [(ids, labels)], _ = encode(tokenizer, tmp_path, [{"messages": CONVERSATION}], "data.format=chat")
    first_prompt, hello, second_prompt, ciao = pieces(
        tokenizer,
        "<|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\n",
        "Hello</s>",
        "<|user|>\nBye</s><|assistant|>\n",
        "Ciao</s>",
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert hello[-1] == ciao[-1] == eos  # each assistant turn ends with EOS, which is a target
    assert ids == [bos] + first_prompt + hello + second_prompt + ciao
    assert labels == masked([bos] + first_prompt) + hello + masked(second_prompt) + ciao
    rendered = tokenizer.apply_chat_template(CONVERSATION, chat_template=BUILTIN_CHAT_TEMPLATE, tokenize=False)
    assert tokenizer.decode(ids[1:]) == rendered


def test_chat_reads_sharegpt_messages_and_split_transcripts_alike(tokenizer, tmp_path):
    expected, _ = encode(tokenizer, tmp_path, [{"messages": CONVERSATION[1:]}], "data.format=chat")
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CONVERSATION[1:]]
    assert encode(tokenizer, tmp_path, [{"conversations": sharegpt}], "data.format=chat", "data.messages_field=conversations")[0] == expected
    transcript = {"text": "### Human: Hi### Assistant: Hello### Human: Bye### Assistant: Ciao"}
    markers = ["data.messages_field=text", "data.user_marker='### Human:'", "data.assistant_marker='### Assistant:'"]
    assert encode(tokenizer, tmp_path, [transcript], "data.format=chat", *markers)[0] == expected


def test_chat_with_the_tokenizers_own_template(tokenizer, tmp_path):
    """A template of the tokenizer is used as it is (it writes its own BOS, or none, as here);
    the end-of-turn marker is part of the assistant's target."""
    own = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    own.chat_template = CHATML
    [(ids, labels)], _ = encode(own, tmp_path, [{"messages": CONVERSATION[1:3]}], "data.format=chat")
    prompt, hello = pieces(own, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>\n")
    assert ids == prompt + hello
    assert labels == masked(prompt) + hello


def test_text(tokenizer, tmp_path):
    [(ids, labels)], _ = encode(tokenizer, tmp_path, [{"text": "assert x == 1"}], "data.format=text")
    (body,) = pieces(tokenizer, "assert x == 1")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids == [bos] + body + [eos]
    assert labels == [IGNORE_INDEX] + body + [eos]


def test_text_split_into_windows_trains_on_every_token_once(tokenizer, tmp_path):
    text = "The assert statement checks a condition and raises AssertionError when it is false. " * 4
    [(whole, _)], _ = encode(tokenizer, tmp_path, [{"text": text}], "data.format=text", "data.seq_len=1024")
    windows, stats = encode(tokenizer, tmp_path, [{"text": text}], "data.format=text", "data.seq_len=16", "data.truncation=split")
    assert stats.truncated == 1 and len(windows) == -(-(len(whole) - 1) // 15)
    assert all(len(ids) <= 16 for ids, _ in windows)
    for (ids, _), (next_ids, _) in zip(windows, windows[1:], strict=False):
        assert next_ids[0] == ids[-1]  # one token of overlap: context for the next window's first target
    targets = [t for _, labels in windows for t in labels if t != IGNORE_INDEX]
    assert targets == whole[1:]


def test_template_with_named_fields_and_numbers(tokenizer, tmp_path):
    overrides = ["data.format=template", 'data.prompt_template="Q: {question}\\nA: "', 'data.completion_template="{answer}"']
    [(ids, labels)], _ = encode(tokenizer, tmp_path, [{"question": "2 + 2?", "answer": 4, "unused": [1]}], *overrides)
    prompt, answer = pieces(tokenizer, "Q: 2 + 2?\nA: ", "4")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids == [bos] + prompt + answer + [eos]
    assert labels == masked([bos] + prompt) + answer + [eos]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.format=template"], "data.completion_template='': is empty"),
        (["data.format=template", "data.completion_template='{0}'"], "data.completion_template='{0}': template fields must be plain names"),
        (["data.format=template", "data.completion_template='{answer'"], "data.completion_template='{answer': not a valid template"),
        (["data.truncation=split"], "data.truncation='split': split is for the text format"),
        (["data.user_marker=Human:"], "data.assistant_marker='': is empty"),
        (["data.eval_split=test", "data.eval_fraction=0.1"], "data.eval_fraction=0.1: give data.eval_split or data.eval_fraction, not both"),
        (["data.batching=bucketed"], "data.batching='bucketed': must be one of packed, length_grouped, padded"),
    ],
)
def test_bad_data_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert str(info.value).startswith(message)


def test_truncation_cut_keeps_the_beginning_and_drops_examples_without_targets(tokenizer, tmp_path):
    rows = [{"instruction": "word " * 200, "output": "answer"}, {"instruction": "Short.", "output": "answer " * 100}]
    [(ids, labels)], stats = encode(tokenizer, tmp_path, rows, "data.seq_len=128")
    assert (stats.too_long, stats.truncated, len(ids), len(labels)) == (1, 1, 128, 128)
    assert ids == [tokenizer.bos_token_id] + pieces(tokenizer, alpaca_prompt("Short."))[0] + pieces(tokenizer, "answer " * 100)[0][: 127 - len(pieces(tokenizer, alpaca_prompt("Short."))[0])]


def test_truncation_drop_skips_long_examples(tokenizer, tmp_path):
    rows = [{"instruction": "Short.", "output": "answer " * 100}, {"instruction": "Short.", "output": "yes"}]
    examples, stats = encode(tokenizer, tmp_path, rows, "data.seq_len=128", "data.truncation=drop")
    assert len(examples) == 1 and stats.too_long == 1 and len(examples[0][0]) < 128


def test_every_example_too_long_is_an_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"rows.jsonl: every example is longer than data.seq_len=16 in its prompt alone"):
        encode(tokenizer, tmp_path, [{"instruction": "word " * 50, "output": "b"}], "data.seq_len=16")


def test_generation_prompts_are_tokenized_as_in_training(tokenizer):
    bos = tokenizer.bos_token_id
    alpaca = compose_config([])
    assert generation_prompt_ids(alpaca, tokenizer, "Hi") == [bos] + pieces(tokenizer, alpaca_prompt("Hi"))[0]
    chat = compose_config(["data.format=chat"])
    assert generation_prompt_ids(chat, tokenizer, "Hi") == [bos] + pieces(tokenizer, "<|user|>\nHi</s><|assistant|>\n")[0]


def test_the_built_in_raw_text_set(tokenizer, tmp_path):
    cfg = compose_config([f"launch.cache_dir={tmp_path}", "data=pydoc_text", "data.seq_len=128"])
    dataset = TokenizedSet.load(prepare(cfg, tokenizer, show_progress=False).train_dir)
    assert len(dataset) > 500 and dataset.lengths.max() == 128 and dataset.lengths.min() < 32  # long-tailed, split
    assert dataset.is_target.sum() == dataset.lengths.sum() - len(dataset)  # every token but each window's first


def test_a_huge_row_gives_the_tokens_of_its_whole_text_without_tokenizing_all_of_it(tokenizer, tmp_path):
    """With cut or drop only the first data.seq_len tokens matter: a row of millions of characters is
    cut before tokenizing (instead of a minute's tokenizing), to exactly the tokens of the whole text."""
    from fsdpqlora.assets import pydoc_qa_records

    text = " ".join(record["output"] for record in pydoc_qa_records()) * 4  # about 1.6 M characters of real prose
    prompt = pieces(tokenizer, alpaca_prompt("Summarize."))[0]
    whole = pieces(tokenizer, text)[0]
    [(ids, labels)], stats = encode(tokenizer, tmp_path, [{"instruction": "Summarize.", "output": text}], "data.seq_len=128")
    assert (stats.truncated, ids) == (1, ([tokenizer.bos_token_id] + prompt + whole)[:128])
    assert labels == masked([tokenizer.bos_token_id] + prompt) + whole[: 127 - len(prompt)]
    rows = [{"instruction": "Summarize.", "output": text}, {"instruction": "Short.", "output": "yes"}]
    examples, stats = encode(tokenizer, tmp_path, rows, "data.seq_len=128", "data.truncation=drop")
    assert (len(examples), stats.too_long) == (1, 1)
