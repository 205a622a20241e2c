"""The offline defaults: a tiny Llama model and two data sets (instruction pairs and raw text), built
from what Python ships.

Both are created on first use under the cache directory, reproducibly (fixed seeds, sorted inputs),
written to a temporary name and renamed, so a crash never leaves a half-built asset behind and
concurrent builders cannot see each other's partial files.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

from fsdpqlora import atomic

# Bump when the recipe below changes, so cached copies of an older recipe are not reused.
TINY_MODEL_VERSION = "v1"
PYDOC_QA_VERSION = "v1"
PYDOC_TEXT_VERSION = "v1"

TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_VOCAB_SIZE = 4096
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}

_HEADING_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir))


def atomic_build(target: Path, build) -> Path:
    """Run build(tmp_dir) and rename the result to target, unless another process won the race."""
    if target.exists():
        return target
    with atomic.building_dir(target, if_exists="keep") as tmp:
        build(tmp)
    return target


def _pydoc_sections() -> list[tuple[str, str, str]]:
    """(topic, heading, body) for every section of every topic in pydoc_data, in a fixed order."""
    from pydoc_data.topics import topics

    sections = []
    for topic in sorted(topics):
        lines = topics[topic].splitlines()
        heading, body = None, []
        for i, line in enumerate(lines):
            underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if _HEADING_UNDERLINE.match(underline) and line.strip() and len(underline) >= len(line.strip()) - 2:
                if heading is not None:
                    sections.append((topic, heading, "\n".join(body)))
                heading, body = line.strip(), []
            elif _HEADING_UNDERLINE.match(line.strip()) and not body:
                continue
            elif heading is not None:
                body.append(line)
        if heading is not None:
            sections.append((topic, heading, "\n".join(body)))
    return sections


def _answer_from(body: str, max_chars: int = 480) -> str:
    """The section's opening text, whole paragraphs up to max_chars. Prose is re-flowed; grammar
    and code blocks keep their lines, so the answer reads like the documentation it came from."""
    answer = ""
    for paragraph in (p for p in re.split(r"\n\s*\n", body) if p.strip()):
        if paragraph.startswith("   "):
            text = textwrap.dedent(paragraph).rstrip()
        else:
            text = " ".join(paragraph.split())
        if answer and len(answer) + len(text) > max_chars:
            break
        answer = f"{answer}\n\n{text}" if answer else text
    return answer[:max_chars]


def pydoc_qa_records() -> list[dict[str, str]]:
    """Instruction records (alpaca format) from the sections of Python's bundled documentation."""
    records = []
    for topic, heading, body in _pydoc_sections():
        answer = _answer_from(body)
        if len(answer) < 40:
            continue
        records.append(
            {
                "instruction": f"What does the Python documentation say about {heading}?",
                "input": "",
                "output": answer,
                "topic": topic,
            }
        )
    return records


def pydoc_qa_path(cache_dir: str) -> Path:
    """The pydoc_qa data set as a JSON-lines file, built on first use."""

    def build(tmp: Path) -> None:
        with open(tmp / "train.jsonl", "w") as f:
            for record in pydoc_qa_records():
                f.write(json.dumps(record) + "\n")

    target = cache_root(cache_dir) / f"pydoc_qa-{PYDOC_QA_VERSION}"
    return atomic_build(target, build) / "train.jsonl"


def pydoc_text_path(cache_dir: str) -> Path:
    """Raw text for continued pre-training: every section of Python's bundled documentation as one
    document (`text` field) of a JSON-lines file, built on first use. Section lengths are long-tailed,
    as real corpora's are."""

    def build(tmp: Path) -> None:
        with open(tmp / "train.jsonl", "w") as f:
            for topic, heading, body in _pydoc_sections():
                f.write(json.dumps({"text": f"{heading}\n\n{textwrap.dedent(body).strip()}", "topic": topic}) + "\n")

    target = cache_root(cache_dir) / f"pydoc_text-{PYDOC_TEXT_VERSION}"
    return atomic_build(target, build) / "train.jsonl"


def train_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [body for _, _, body in _pydoc_sections()]
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    # Like Llama's tokenizers: encode() starts every sequence with BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )
    fast.save_pretrained(out_dir)
    return fast


def _pretrain(model, tokenizer, steps: int = 200, seq_len: int = 128, batch_size: int = 16) -> None:
    """A minute of full-parameter next-token training on the bundled docs, so that the base model
    writes doc-like text and LoRA fine-tuning starts from a language model, as it does in real use.
    Seeded, so the same machine always builds the same weights."""
    import torch
    from tqdm import tqdm

    text = "\n\n".join(body for _, _, body in _pydoc_sections())
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / steps)
    )
    model.train()
    for _ in tqdm(range(steps), desc="pretraining the tiny base model (once)", unit="step"):
        batch = rows[torch.randint(0, len(rows), (batch_size,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def tiny_model_path(cache_dir: str) -> Path:
    """A small Llama-architecture model directory (config, sharded safetensors, tokenizer), built
    on first use: random weights from a fixed seed, then briefly pretrained on Python's docs."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = train_tokenizer(tmp)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_LLAMA,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        _pretrain(model, tokenizer)
        # Several shards with an index, like every real checkpoint, so the default run exercises
        # the same loading path as a 70B model.
        model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="4MB")

    return atomic_build(cache_root(cache_dir) / f"tiny-llama-{TINY_MODEL_VERSION}", build)
