"""Which sequences each rank trains on at each step, and the position in the data, saved and restored.

Every optimizer step consumes one global batch of G = micro_batch_size x grad_accum_steps x workers
sequences (packed rows, or single examples without packing). The sequences of an epoch, and how
they are cut into global batches, depend on the seed, the epoch and G only, and every rank computes
them alike without communicating. Micro-batch j of a global batch goes to rank j % workers as its
accumulation step j // workers. So the examples behind a step are the same for any world size with
the same G, and with the token-weighted loss so is the step itself.

Epochs reshuffle: the order of the examples (and so the mix of packed rows) and the order of the
sequences are drawn from (seed, epoch). The global batches that do not fill up at an epoch's end
are left out of it (others are left out the next epoch). The position is (epoch, step in epoch):
`state_dict()` saves it with what it is only valid for, and a restored StepBatches continues with
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fsdpqlora.config import Config
from fsdpqlora.data.packing import best_fit_decreasing, collate, length_grouped, sequence_length
from fsdpqlora.data.tokenize import IGNORE_INDEX, TokenizedSet
from fsdpqlora.errors import DataError

# Length grouping sorts windows of this many global batches, as Hugging Face's LengthGroupedSampler
# sorts its mega-batches: enough to find similar lengths, few enough to keep batches random.
LENGTH_GROUP_WINDOW = 50


@dataclass
class StepTokens:
    """Real tokens, token slots (real + padding) and target tokens of one global batch."""

    tokens: int
    slots: int
    targets: int

    @property
    def padding(self) -> float:
        return 1.0 - self.tokens / self.slots


def split_eval(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out eval) example indices: a seeded random `fraction` of them held out."""
    order = np.random.default_rng([seed, 1_000_003]).permutation(num_examples)
    held_out = math.ceil(num_examples * fraction) if fraction > 0 else 0
    return np.sort(order[held_out:]), np.sort(order[:held_out])


class StepBatches:
    """This rank's micro-batches for each optimizer step, one step after the other."""

    def __init__(self, dataset: TokenizedSet, examples: np.ndarray, cfg: Config, rank: int, world_size: int, pad_id: int):
        self.dataset, self.examples = dataset, np.asarray(examples, dtype=np.int64)
        self.batching, self.seq_len, self.seed = cfg.data.batching, cfg.data.seq_len, cfg.train.seed
        self.micro, self.accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.global_batch = self.micro * self.accum * world_size
        self.epoch, self.step_in_epoch = 0, 0
        self._plan_of: tuple[int, list[list[list[int]]]] = (-1, [])
        self.steps_per_epoch = len(self._plan(0))
        if self.steps_per_epoch == 0:
            rows = len(self._sequences(0))
            packed = f" pack into {rows} row{'s' if rows > 1 else ''} of data.seq_len={self.seq_len} tokens," if self.batching == "packed" else ""
            raise DataError(
                f"{len(self.examples)} examples{packed} fewer than one global batch of {self.global_batch} "
                "(micro_batch_size x grad_accum_steps x workers)"
            )
        self.last_step = StepTokens(0, 1, 0)

    def _sequences(self, epoch: int) -> list[list[int]]:
        """This epoch's sequences in order: consecutive runs of G make its global batches."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.examples)
        lengths = self.dataset.lengths
        if self.batching == "packed":
            rows = best_fit_decreasing(lengths, order, self.seq_len)
            return [rows[i] for i in rng.permutation(len(rows))]
        if self.batching == "padded":
            return [[int(e)] for e in order]
        # length_grouped: global batches of similar lengths, in random order; in each, micro-batches
        # cut longest first, then dealt out in random order so no rank always gets the longest
        batches = length_grouped(lengths, order, self.global_batch, LENGTH_GROUP_WINDOW)
        sequences = []
        for i in rng.permutation(len(batches)):
            chunks = [batches[i][s : s + self.micro] for s in range(0, self.global_batch, self.micro)]
            sequences += [[e] for c in rng.permutation(len(chunks)) for e in chunks[c]]
        return sequences

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        if self._plan_of[0] != epoch:
            sequences = self._sequences(epoch)
            g = self.global_batch
            self._plan_of = (epoch, [sequences[s : s + g] for s in range(0, len(sequences) - g + 1, g)])
        return self._plan_of[1]

    def _micro_batch(self, batch: list[list[int]], slot: int) -> list[list[int]]:
        return batch[slot * self.micro : (slot + 1) * self.micro]

    def step_tokens(self, batch: list[list[int]]) -> StepTokens:
        lengths = [sequence_length(self.dataset, seq) for seq in batch]
        slots = sum(
            len(chunk) * max(chunk) for chunk in (lengths[s : s + self.micro] for s in range(0, len(lengths), self.micro))
        )
        return StepTokens(sum(lengths), slots, sum(target_count(self.dataset, seq) for seq in batch))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's grad_accum_steps micro-batches of the next global batch; advances the position."""
        batch = self._plan(self.epoch)[self.step_in_epoch]
        packed = self.batching == "packed"
        micro_batches = [
            collate(self.dataset, self._micro_batch(batch, k * self.world_size + self.rank), self.pad_id, packed)
            for k in range(self.accum)
        ]
        self.last_step = self.step_tokens(batch)
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return micro_batches

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    def epoch_sequences(self, epoch: int = 0) -> int:
        """Sequences (packed rows, or examples) the epoch makes, before the last incomplete global batch is left out."""
        return len(self._sequences(epoch))

    def epoch_padding(self, epoch: int = 0) -> float:
        """The fraction of padding tokens over all the global batches of an epoch."""
        steps = [self.step_tokens(batch) for batch in self._plan(epoch)]
        return 1.0 - sum(s.tokens for s in steps) / sum(s.slots for s in steps)

    def epoch_tokens(self, epoch: int = 0) -> int:
        """The tokens (padding not counted) of all the global batches of an epoch."""
        return sum(self.step_tokens(batch).tokens for batch in self._plan(epoch))

    def state_dict(self) -> dict:
        """The position, with what it is valid for: plain Python values."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise DataError(
                    f"the saved data position does not fit this run: its {key} was {state.get(key)!r}, now {value!r}; "
                    "the batches would differ from the interrupted run's"
                )
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch:
            raise DataError(f"the saved data position (step {state['step_in_epoch']} of an epoch) is past this run's {self.steps_per_epoch} steps per epoch")
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def _identity(self) -> dict:
        digest = hashlib.sha256(self.examples.tobytes()).hexdigest()[:16]
        return {
            "seed": self.seed,
            "batching": self.batching,
            "global_batch": self.global_batch,
            "data": f"{self.dataset.key}:{digest}",
        }


def target_count(dataset: TokenizedSet, sequence: list[int]) -> int:
    """The tokens of a sequence's row that carry loss, as the step counts them from its labels: all
    but the row's first token, which nothing precedes. Every rank computes a global batch's count
    this way, so scaling the loss by it needs no communication."""
    first = dataset.offsets[sequence[0]]
    marked = sum(int(dataset.is_target[dataset.offsets[e] : dataset.offsets[e + 1]].sum()) for e in sequence)
    return marked - int(dataset.is_target[first])


class EvalBatches:
    """The evaluation examples as micro-batches, in a fixed order, shared out among the ranks."""

    def __init__(self, dataset: TokenizedSet, examples: np.ndarray, cfg: Config, pad_id: int):
        self.dataset, self.pad_id = dataset, pad_id
        examples = np.asarray(examples, dtype=np.int64)
        self.packed = cfg.data.batching == "packed"
        if self.packed:
            sequences = best_fit_decreasing(dataset.lengths, examples, cfg.data.seq_len)
        else:  # longest first, so each micro-batch holds similar lengths
            sequences = [[int(e)] for e in examples[np.argsort(-dataset.lengths[examples], kind="stable")]]
        micro = cfg.train.micro_batch_size
        self.micro_batches = [sequences[s : s + micro] for s in range(0, len(sequences), micro)]
        self.examples = examples
        self.num_examples = len(examples)

    def prompts(self, count: int) -> list[tuple[list[int], list[int]]]:
        """The first `count` evaluation examples cut into (prompt ids, the rest: what the model should write)."""
        cut = []
        for i in self.examples[:count].tolist():
            ids, n = self.dataset.input_ids(i).tolist(), self.dataset.prompt_length(i)
            cut.append((ids[:n], ids[n:]))
        return cut

    def for_rank(self, rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches j = rank, rank + world_size, ...; every rank gets as many, because FSDP's
        collectives run in every forward: a rank with none left gets a stand-in without targets."""
        rounds = math.ceil(len(self.micro_batches) / world_size)
        for j in range(rank, rounds * world_size, world_size):
            if j < len(self.micro_batches):
                yield collate(self.dataset, self.micro_batches[j], self.pad_id, self.packed)
            else:
                stand_in = collate(self.dataset, self.micro_batches[0], self.pad_id, self.packed)
                stand_in["labels"].fill_(IGNORE_INDEX)
                yield stand_in
