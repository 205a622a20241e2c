"""Evaluation: the loss, the mean over every target token of the evaluation data, all ranks together;
and, when generate.eval_samples asks, a few evaluation prompts answered by the model in training."""

from __future__ import annotations

import torch

from fsdpqlora.config import Config
from fsdpqlora.data import EvalBatches
from fsdpqlora.logs import log
from fsdpqlora.parallel.process_group import Dist, agree
from fsdpqlora.train.step import summed_loss, target_tokens


@torch.no_grad()
def evaluation_loss(model, batches: EvalBatches, d: Dist) -> dict[str, float]:
    """Token-weighted, so the same for any number of ranks. Eval mode turns LoRA dropout off."""
    model.eval()
    loss_sum, targets = torch.zeros((), dtype=torch.float64, device=d.device), 0
    try:
        for batch in batches.for_rank(d.rank, d.world_size):
            loss_sum += summed_loss(model, batch, d.device)
            targets += target_tokens(batch["labels"])
    finally:
        model.train()
    all_loss_sum, total = agree(d, sums=[loss_sum, targets], maxes=[])
    return {"eval_loss": all_loss_sum / total, "eval_tokens": total}


@torch.no_grad()
def greedy_answers(model, prompts: list[list[int]], max_new_tokens: int, d: Dist) -> list[list[int]]:
    """Each prompt continued greedily by the sharded model, on every rank alike.

    Every forward of an FSDP2 model all-gathers each layer's shards, a collective every rank must
    join, so generation runs on all ranks: the same prompt, exactly max_new_tokens forwards each
    (no stop at EOS, which could end one rank's loop before another's and hang the rest; the
    caller cuts the answer at EOS). Not transformers' generate(), whose stopping decides the number
    of forwards; not the saved adapter on a second copy of the base in one process, which needs the
    memory of a whole second model beside training's. No KV cache: a few short answers per evaluation."""
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt], device=d.device)
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            answers.append(ids[0, len(prompt) :].tolist())
    finally:
        model.train()
    return answers


def until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


class Evaluator:
    """Evaluates every train.eval_every steps and after the last one, when there is evaluation data."""

    def __init__(self, cfg: Config, batches: EvalBatches | None, d: Dist, tokenizer=None):
        self.every, self.last_step = cfg.train.eval_every, cfg.train.max_steps
        self.batches, self.d, self.tokenizer = batches, d, tokenizer
        self.samples, self.max_new_tokens = cfg.generate.eval_samples, cfg.generate.max_new_tokens

    def due(self, step: int) -> bool:
        return self.batches is not None and ((self.every and step % self.every == 0) or step == self.last_step)

    def maybe_evaluate(self, step: int, model) -> dict[str, float] | None:
        if not self.due(step):
            return None
        metrics = evaluation_loss(model, self.batches, self.d)
        if self.samples and self.max_new_tokens and self.tokenizer is not None:
            self.show_samples(step, model)
        return metrics

    def show_samples(self, step: int, model) -> None:
        cut = self.batches.prompts(self.samples)
        answers = greedy_answers(model, [prompt for prompt, _ in cut], self.max_new_tokens, self.d)
        if not self.d.is_main:
            return
        decode, eos = self.tokenizer.decode, self.tokenizer.eos_token_id
        for number, ((prompt, expected), answer) in enumerate(zip(cut, answers, strict=True), 1):
            log.info(
                f"step {step:>5}  sample {number}/{len(cut)} (greedy, {self.max_new_tokens} tokens at most)\n"
                f"  prompt:   {decode(prompt, skip_special_tokens=True).strip()[-300:]}\n"
                f"  expected: {decode(until_eos(expected, eos), skip_special_tokens=True).strip()[:300]}\n"
                f"  answer:   {decode(until_eos(answer, eos), skip_special_tokens=True).strip()}"
            )
