"""The data pipeline: rows -> format -> tokens and loss mask (cached) -> packed or padded batches per rank.

    sources.py   local files (json, jsonl, parquet, csv, txt), directories of them, hub data sets
    formats.py   alpaca, chat, text and user templates: a row -> prompt and completion segments
    tokenize.py  segments -> token ids and loss mask, truncation, the tokenized cache
    packing.py   packed rows (position ids per example) and padded micro-batches
    sampler.py   each epoch's global batches, each rank's share, the restorable position
    pipeline.py  the above in order, for the launcher and the workers
"""

from fsdpqlora.data.formats import alpaca_prompt, make_format
from fsdpqlora.data.pipeline import (
    Data,
    PreparedData,
    build_batches,
    check_sources,
    generation_prompt_ids,
    load_data,
    pad_id_of,
    prepare,
    tokenizer_for_export,
)
from fsdpqlora.data.sampler import EvalBatches, StepBatches
from fsdpqlora.data.tokenize import IGNORE_INDEX, TokenizedSet

__all__ = [
    "IGNORE_INDEX",
    "Data",
    "EvalBatches",
    "PreparedData",
    "StepBatches",
    "TokenizedSet",
    "alpaca_prompt",
    "build_batches",
    "check_sources",
    "generation_prompt_ids",
    "load_data",
    "make_format",
    "pad_id_of",
    "prepare",
    "tokenizer_for_export",
]
