"""Answer a prompt with the saved adapter, loaded the way the ecosystem loads it: the base through
transformers + BitsAndBytesConfig, the adapter through peft.PeftModel.from_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from fsdpqlora.data import generation_prompt_ids
from fsdpqlora.quant import to_dtype


def bnb_config(cfg: DictConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=to_dtype(cfg.quant.compute_dtype),
        bnb_4bit_quant_storage=to_dtype(cfg.quant.storage_dtype),
    )


def load_for_inference(cfg: DictConfig, model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb_config(cfg),
        dtype=to_dtype(cfg.model.dtype),
        device_map=device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def answer(model, tokenizer, cfg: DictConfig, instruction: str, max_new_tokens: int) -> str:
    """Greedy answer to `instruction`, put in the prompt of the format the adapter was trained on."""
    input_ids = torch.tensor([generation_prompt_ids(cfg, tokenizer, instruction)], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        # a tiny model's greedy output loops on itself; forbidding repeated trigrams keeps it readable
        no_repeat_ngram_size=3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def show_generation(cfg: DictConfig, run_dir: Path) -> None:
    from fsdpqlora.model import resolve_model_dir

    model, tokenizer = load_for_inference(cfg, resolve_model_dir(cfg), run_dir / "adapter")
    text = answer(model, tokenizer, cfg, cfg.generate.prompt, cfg.generate.max_new_tokens)
    print(f"\n[fsdpqlora] prompt: {cfg.generate.prompt}\n[fsdpqlora] answer (base + saved adapter, greedy): {text.strip()}\n", flush=True)
