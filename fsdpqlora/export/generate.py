"""Answering prompts with a trained result, loaded the way the ecosystem loads it: the base through
transformers + BitsAndBytesConfig and the adapter through peft.PeftModel.from_pretrained, or a
merged model directory through transformers alone.

`fsdpqlora generate PATH --prompt TEXT` (a run, checkpoint, adapter or merged model directory), and
the sample a run prints at its end (`generate.prompt`), share this code.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdpqlora.compat import exact_4bit_kernels
from fsdpqlora.config import Config
from fsdpqlora.data import EvalBatches, generation_prompt_ids
from fsdpqlora.errors import ConfigError, DataError, exit_on_user_error
from fsdpqlora.export.locate import TOKENIZER_CONFIG
from fsdpqlora.model.quant import to_dtype


def bnb_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=to_dtype(cfg.quant.compute_dtype),
        bnb_4bit_quant_storage=to_dtype(cfg.quant.storage_dtype),
    )


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(cfg: Config, model_dir: Path, adapter_dir: Path):
    """The 4-bit base as transformers quantizes it, with the adapter on it through peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb_config(cfg),
        dtype=to_dtype(cfg.model.dtype),
        device_map=_device(),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    exact_4bit_kernels(base)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    # The tokenizer saved with the adapter carries the chat template training used.
    has_tokenizer = (adapter_dir / TOKENIZER_CONFIG).is_file()
    return model, AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else model_dir)


def load_merged(cfg: Config, model_dir: Path):
    """A model directory as transformers loads it (in 4-bit when its config.json says so)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", device_map=_device(), trust_remote_code=cfg.model.trust_remote_code
    )
    exact_4bit_kernels(model)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # A tiny model's greedy output loops on itself; forbidding repeated n-grams keeps it readable.
    no_repeat_ngram_size: int = 0


@torch.no_grad()
def answer(model, tokenizer, prompt_ids: list[int], sampling: Sampling) -> str:
    input_ids = torch.tensor([prompt_ids], device=model.device)
    options = {"do_sample": False}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=sampling.max_new_tokens,
        no_repeat_ngram_size=sampling.no_repeat_ngram_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **options,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def show_generation(cfg: Config, run_dir: Path, evaluation: EvalBatches | None = None) -> None:
    """The end-of-run sample, answered greedily with the saved adapter: generate.prompt, or the
    prompt of the first evaluation example (beside what that example's answer is)."""
    from fsdpqlora.logs import log
    from fsdpqlora.model.directory import resolve_model_dir

    if not cfg.generate.prompt and evaluation is None:
        log.info("[fsdpqlora] no end-of-run sample: no evaluation data to draw a prompt from; set generate.prompt")
        return
    model, tokenizer = load_for_inference(cfg, resolve_model_dir(cfg), run_dir / "adapter")
    expected = ""
    if cfg.generate.prompt:
        shown, ids = cfg.generate.prompt, generation_prompt_ids(cfg, tokenizer, cfg.generate.prompt)
    else:
        ids, rest = evaluation.prompts(1)[0]
        shown = tokenizer.decode(ids, skip_special_tokens=True).strip()
        eos = tokenizer.eos_token_id
        expected = tokenizer.decode(rest[: rest.index(eos)] if eos in rest else rest, skip_special_tokens=True).strip()
        expected = f"[fsdpqlora] the evaluation example's answer: {expected}\n"
    text = answer(model, tokenizer, ids, Sampling(cfg.generate.max_new_tokens, no_repeat_ngram_size=3))
    log.info(f"\n[fsdpqlora] prompt: {shown}\n{expected}"
             f"[fsdpqlora] answer (base + saved adapter, greedy): {text.strip()}\n")


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a text file, or the "prompt" field of each row of a data
    file (.jsonl, .json, .csv, .parquet), read as training reads data files."""
    from fsdpqlora.data.sources import read_file

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        return [line for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for row in read_file(path):
        if not isinstance(row.fields.get("prompt"), str):
            raise DataError(f"{row.where}: no string field 'prompt'")
        prompts.append(row.fields["prompt"])
    return prompts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fsdpqlora generate",
        description="Answer prompts with a trained adapter on its 4-bit base, or with a merged model.",
    )
    parser.add_argument("path", help="a run, checkpoint, adapter or merged model directory")
    parser.add_argument("--base", help="the base model directory or hub id (default: the run's model, or the adapter's)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or a .jsonl/.json/.csv/.parquet file with a \"prompt\" field")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="feed the prompt as it is, not in the training format's prompt")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        from fsdpqlora.export.locate import locate

        prompts = args.prompt + (read_prompts(Path(args.prompts_file)) if args.prompts_file else [])
        if not prompts:
            raise ConfigError("no prompt: give --prompt TEXT or --prompts-file FILE")
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0, --top-p in (0, 1]")
        trained = locate(args.path, args.base)
        raw = args.raw or trained.cfg_file is None
        if raw and not args.raw:
            print(f"[fsdpqlora] no run configuration found for {args.path}; prompts are used as they are", flush=True)
        if trained.adapter_dir is not None:
            model, tokenizer = load_for_inference(trained.cfg, trained.model_dir, trained.adapter_dir)
            what = f"{trained.model_dir} (4-bit) + adapter {trained.adapter_dir}"
        else:
            model, tokenizer = load_merged(trained.cfg, trained.model_dir)
            what = str(trained.model_dir)
    print(f"[fsdpqlora] model: {what}", flush=True)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    for number, prompt in enumerate(prompts, 1):
        torch.manual_seed(args.seed)  # each answer the same whatever the prompts before it
        ids = tokenizer(prompt)["input_ids"] if raw else generation_prompt_ids(trained.cfg, tokenizer, prompt)
        text = answer(model, tokenizer, ids, sampling)
        print(f"\n[{number}/{len(prompts)}] prompt: {prompt}\n[{number}/{len(prompts)}] answer: {text.strip()}", flush=True)
    return 0
