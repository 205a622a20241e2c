"""`fsdpqlora data`: the data as the model will see it, from the launcher's own pipeline: each
example decoded with the tokens without loss between [[ and ]], its token counts, and what
truncation and packing did."""

from __future__ import annotations

import json

from tests.helpers import base_overrides, qa_overrides, run_launcher


def test_the_preview_marks_the_prompt_and_says_what_truncation_and_packing_do(tmp_path, model_dir, cache_dir, qa_file):
    first = json.loads(qa_file.read_text().splitlines()[0])
    overrides = [*base_overrides(model_dir, cache_dir), *qa_overrides(qa_file), "data.eval_fraction=0"]
    result = run_launcher("data", "-n", "2", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"[fsdpqlora] data: {qa_file} (template): 80 rows -> 80 examples (1 cut to data.seq_len=128, ")
    assert "[fsdpqlora] packing: 80 examples into " in out and "[fsdpqlora] global batch: 4 sequences = " in out
    examples = out.split("\n--- example ")[1:]
    assert len(examples) == 2
    header, text = examples[0].split("\n", 1)
    assert text.rstrip("\n") == f"[[<s>Question: {first['question']}\nAnswer: ]]{first['answer']}</s>"
    n, trained = (int(word) for word in header.split()[1:4:2])
    assert 0 < trained < n

    result = run_launcher("data", "-n", "1", *overrides, "data.seq_len=40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--- example 1: 40 tokens, " in result.stdout and "data.seq_len reached (data.truncation=cut)" in result.stdout
