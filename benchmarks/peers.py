"""fsdpqlora against the Hugging Face route (transformers + bitsandbytes + peft + Trainer), side by side.

    .venv/bin/python benchmarks/peers.py                          # 3 rounds x 120 steps
    .venv/bin/python benchmarks/peers.py --rounds 1 --steps 10    # a quick look
    python benchmarks/peers.py --cuda                             # GPUs: NCCL, and accelerate's FSDP

Both routes train the built-in `tiny` Llama on the built-in alpaca-format data set (pydoc_qa), two
processes (gloo on CPU), each started the way its users start it: ours with torchrun
`-m fsdpqlora.train` and config overrides, theirs with `accelerate launch` of
benchmarks/peers_hf_worker.py. Two comparisons:

(a) like for like: the same examples as byte-identical token ids and labels (made once by our data
    pipeline), in the same order, the same micro-batches on the same ranks, 8 examples per step,
    data.seq_len 256, padded; LoRA r 16 on all seven linears with the same alpha and dropout;
    gradient checkpointing on both; fp32 compute; the same AdamW, clipping and cosine schedule;
    both replicate the model on each rank and average the adapter's gradients (ours shard=no_shard,
    theirs DDP).
    Checked before anything is timed: the first pair of runs must have fed identical micro-batches
    (a hash per micro-batch, step and rank) and have equal losses at step 1 (LoRA's B starts at
    zero, so the initial adapters, drawn differently, do not change it) and close ones after.
(b) each with its recommended defaults for the same job (8 examples' worth of tokens per step):
    ours with its defaults and the levers `fsdpqlora plan` proposes (packing, warm-up, the sharding
    and checkpointing the planner picks, the precision of our CPU demo or bf16 on GPUs), as many
    packed rows per step as carry about the real tokens of 8 examples; theirs with the usual QLoRA
    recipe (8 examples a step padded to their longest by DataCollatorForSeq2Seq, cosine with 3%
    warm-up); each until the same number of real tokens; tokens/s of real (non-padding) tokens and
    the evaluation loss on the same held-out examples (--seed draws other ones, and other initial
    adapters, data orders and dropout masks).

Routes run in interleaved rounds (the order reversed every other round), and results are ratios
measured in the same invocation. On CPU accelerate runs the Hugging Face side as DDP: asked for FSDP
on CPU it would run DDP or unsynchronised replicas, so DDP it is, and the worker checks it. With
--cuda it runs accelerate's FSDP (FULL_SHARD, the FSDP-QLoRA recipe: 4-bit bytes stored in the
compute dtype). Results: benchmarks/results/peers-<tag>-<date>.json (and .png: the losses) with the machine.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from report import describe_machine, save_report
from throughput import WARMUP_STEPS, add_common_arguments, check_steps, hydra_path, omp_threads, worker_command

WORKER = Path(__file__).resolve().parent / "peers_hf_worker.py"
# What the Hugging Face route needs; the first three are fsdpqlora's dependencies too.
HF_PIECES = ("transformers", "peft", "bitsandbytes", "accelerate")

# The two routes compute the same step-1 loss from different code (FSDP2 and our chunked loss; DDP and
# the whole logits), in fp32: only the order of additions differs.
STEP1_RELATIVE_TOLERANCE = 1e-4
# Later steps drift apart: the initial LoRA A matrices and the dropout masks are drawn from different
# random streams (same distributions), so the trajectories are alike, not equal: 0.12% apart at most over
# 120 steps when this was written.
TRAJECTORY_RELATIVE_TOLERANCE = 0.01

IGNORE_INDEX = -100
FIRST_STEP_OURS = re.compile(r"\bstep\s+1\s+loss")  # our first progress line (train.log_every=1), after the bar's \r
FIRST_STEP_HF = "[peers-hf] first step done"
PEAK_PER_RANK = re.compile(r"rank (\d+): ([\d.]+) GiB")


@dataclass
class RouteRun:
    """One launch of one route."""

    losses: list[float]
    step_tokens: list[int]  # real (non-padding) tokens of each step's global batch
    step_seconds: list[float]
    eval_loss: float
    first_step_s: float  # from starting the launcher to the end of the first step
    wall_s: float
    peak_gib_per_rank: list[float]  # host RSS, or CUDA allocated with --cuda
    peak_cuda_reserved_gib_per_rank: list[float] | None = None  # the HF route's, with --cuda
    step_targets: list[int] | None = None  # target tokens of each step's global batch, as our run counted them
    batch_hashes: list[list[str]] | None = None  # per rank, of every micro-batch the HF Trainer handed the model

    @property
    def tokens_per_s(self) -> list[float]:
        return [t / s for t, s in zip(self.step_tokens, self.step_seconds, strict=True)]

    @property
    def steady_tokens_per_s(self) -> float:
        return statistics.median(self.tokens_per_s[WARMUP_STEPS:])


@dataclass
class Route:
    name: str
    runs: list[RouteRun] = field(default_factory=list)

    def summary(self) -> dict:
        per_run = [run.steady_tokens_per_s for run in self.runs]
        median = statistics.median([rate for run in self.runs for rate in run.tokens_per_s[WARMUP_STEPS:]])
        return {
            "tokens_per_s": median,
            "spread": (max(per_run) - min(per_run)) / median,
            "first_step_s": statistics.median(run.first_step_s for run in self.runs),
            "peak_gib_per_rank": [max(ranks) for ranks in zip(*(run.peak_gib_per_rank for run in self.runs), strict=True)],
            "eval_loss": statistics.median(run.eval_loss for run in self.runs),
            "steps": len(self.runs[0].losses),
            "real_tokens": sum(self.runs[0].step_tokens),
        }


@dataclass
class Comparison:
    name: str
    ours: Route
    hf: Route
    ours_overrides: list[str]
    hf_settings: dict
    ours_tokens: int  # the real tokens of our run's steps, as computed here from our batches
    check: dict = field(default_factory=dict)  # like-for-like only: what was checked equal

    def ratios(self) -> list[float]:
        """ours / HF tokens/s, per round (each round's pair ran minutes apart at most)."""
        return [o.steady_tokens_per_s / h.steady_tokens_per_s for o, h in zip(self.ours.runs, self.hf.runs, strict=True)]


# ----- the data, from our pipeline -----


def sequential_order(per_rank: list[list[list]]) -> list:
    """Micro-batches in the order a sequential sampler must yield them so that accelerate and the
    Trainer hand rank r, at step s, accumulation step k, the micro-batch `per_rank[r][s][k]`.

    accelerate's BatchSamplerShard deals the b-th batch to rank b % world, and the Trainer takes
    each rank's consecutive batches as the accumulation steps of one optimizer step; so batch
    b = (s * accum + k) * world + r. It is also fsdpqlora's rule (fsdpqlora/data/sampler.py):
    micro-batch j = k * world + r of a global batch goes to rank j % world."""
    world, steps, accum = len(per_rank), len(per_rank[0]), len(per_rank[0][0])
    return [per_rank[r][s][k] for s in range(steps) for k in range(accum) for r in range(world)]


def rows_of(batch) -> list[tuple[list[int], list[int]]]:
    """The examples of a padded micro-batch, without their padding (every row starts at 0)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [(batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()) for i, n in enumerate(lengths)]


def target_count(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class Batches:
    """What our pipeline feeds each rank, step by step, and what that makes for the other route."""

    per_rank: list[list[list]]  # [rank][step][accumulation step] -> micro-batch tensors
    eval_rows: list[tuple[list[int], list[int]]]

    @property
    def steps(self) -> int:
        return len(self.per_rank[0])

    def step_tokens(self) -> list[int]:
        return [sum(int(mb["attention_mask"].sum()) for rank in self.per_rank for mb in rank[s]) for s in range(self.steps)]

    def step_targets(self) -> list[int]:
        return [sum(target_count(mb) for rank in self.per_rank for mb in rank[s]) for s in range(self.steps)]

    def hashes(self) -> list[list[str]]:
        from peers_hf_worker import batch_hash  # the worker's own, so both sides hash alike

        return [[batch_hash(mb) for step in rank for mb in step] for rank in self.per_rank]

    def hf_rows(self) -> list[tuple[list[int], list[int]]]:
        return [row for mb in sequential_order(self.per_rank) for row in rows_of(mb)]


def our_batches(overrides: list[str], world: int, cache_dir: str, steps: int | None = None, tokens: int | None = None) -> Batches:
    """Our run's micro-batches for each rank, as its workers make them (the same code, the same
    config): `steps` steps, or as many as it takes to reach `tokens` real tokens."""
    from fsdpqlora import assets
    from fsdpqlora.config import compose_config
    from fsdpqlora.data import build_batches, pad_id_of, prepare
    from fsdpqlora.model.directory import check_tokenizer

    cfg = compose_config([f"launch.cache_dir={hydra_path(cache_dir)}", *overrides])
    tokenizer = check_tokenizer(assets.tiny_model_path(cfg.launch.cache_dir))
    prepared = prepare(cfg, tokenizer, show_progress=False)
    data = [build_batches(cfg, prepared, rank, world, pad_id_of(tokenizer)) for rank in range(world)]
    per_rank: list[list[list]] = [[] for _ in range(world)]
    seen = 0
    while (steps is not None and len(per_rank[0]) < steps) or (tokens is not None and seen < tokens):
        for rank in range(world):
            per_rank[rank].append(data[rank].train.next_step())
        seen += sum(int(mb["attention_mask"].sum()) for rank in per_rank for mb in rank[-1])
    evaluation = data[0].eval
    eval_rows = [(evaluation.dataset.input_ids(i).tolist(), evaluation.dataset.labels(i).tolist()) for i in evaluation.examples.tolist()]
    return Batches(per_rank, eval_rows)


# ----- running the routes -----


def launch(command: list[str], env: dict, first_step_marker, log_path: Path) -> tuple[int, str, float, float]:
    """Run a launcher, its output read as it comes: (exit code, output, seconds to the first step's
    line, wall seconds)."""
    started = time.perf_counter()
    first_step = math.nan
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def read() -> None:
        nonlocal first_step
        for line in process.stdout:
            if math.isnan(first_step) and first_step_marker(line):
                first_step = time.perf_counter() - started
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    code = process.wait()
    reader.join()
    output = "".join(lines)
    log_path.write_text(output)
    return code, output, first_step, time.perf_counter() - started


def child_env(args: argparse.Namespace) -> dict:
    # The same threads per worker for both routes (the `fsdpqlora` launcher's share of the cores);
    # unbuffered, so the first step's line is seen when it is written.
    env = dict(os.environ, OMP_NUM_THREADS=str(omp_threads(args.nproc)), PYTHONUNBUFFERED="1")
    if not args.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_ours(overrides: list[str], steps: int, work_dir: Path, args: argparse.Namespace) -> RouteRun:
    run_dir = Path(tempfile.mkdtemp(prefix="ours-", dir=work_dir))
    # the end's checkpoint only, as the other route saves none
    command = worker_command(run_dir, steps, args, ["logger.plots=false", "checkpoint.every_steps=0", *overrides])
    code, output, first_step, wall = launch(command, child_env(args), FIRST_STEP_OURS.search, run_dir / "launch.log")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    steps_done = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    peaks = re.search(r"peak memory per rank \([^)]*\): (.*)", output)
    if len(steps_done) != steps or not evals or peaks is None:
        sys.exit(f"peers: our training failed (exit code {code}): {' '.join(command)}\n{output[-6000:]}")
    return RouteRun(
        losses=[r["loss"] for r in steps_done],
        step_tokens=[int(r["tokens"]) for r in steps_done],
        # tokens_per_s is logged per step: real tokens over the time since the previous step's line
        step_seconds=[r["tokens"] / r["tokens_per_s"] for r in steps_done],
        eval_loss=evals[-1]["eval_loss"],
        first_step_s=first_step,
        wall_s=wall,
        peak_gib_per_rank=[float(gib) for _, gib in PEAK_PER_RANK.findall(peaks.group(1))],
        step_targets=[int(r["target_tokens"]) for r in steps_done],
    )


def accelerate_command(args: argparse.Namespace, settings: dict) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.nproc), "--num_machines", "1",
               "--main_process_port", "0", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(omp_threads(args.nproc)),
               "--mixed_precision", "bf16" if settings["dtype"] == "bfloat16" else "no"]  # fmt: skip
    if settings["parallel"] == "ddp":
        # On CPU too: without --multi_gpu accelerate starts one process; the worker's use_cpu makes it gloo DDP.
        return [*command, "--multi_gpu"]
    return [
        *command, "--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
        "--fsdp_use_orig_params", "false", "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true",
    ]  # fmt: skip


def run_hf(rows: list, eval_rows: list, settings: dict, work_dir: Path, args: argparse.Namespace) -> RouteRun:
    """One launch of the Hugging Face route."""
    import torch

    from fsdpqlora import assets

    out_dir = Path(tempfile.mkdtemp(prefix="hf-", dir=work_dir))
    job = out_dir / "job.pt"
    model_dir = str(assets.tiny_model_path(args.cache_dir))
    torch.save({"settings": settings, "train": rows, "eval": eval_rows, "model_dir": model_dir}, job)
    command = [*accelerate_command(args, settings), str(WORKER), str(job), str(out_dir)]
    code, output, first_step, wall = launch(command, child_env(args), lambda line: FIRST_STEP_HF in line, out_dir / "launch.log")
    ranks = [out_dir / f"rank{r}.json" for r in range(args.nproc)]
    if not all(path.exists() for path in ranks):
        sys.exit(f"peers: the Hugging Face route failed (exit code {code}): {' '.join(command)}\n{output[-6000:]}")
    records = [json.loads(path.read_text()) for path in ranks]
    micro, accum, world = settings["micro_batch_size"], settings["grad_accum_steps"], args.nproc
    per_step = micro * accum * world
    step_tokens = [sum(len(ids) for ids, _ in rows[s * per_step : (s + 1) * per_step]) for s in range(settings["steps"])]
    return RouteRun(
        losses=records[0]["losses"],
        step_tokens=step_tokens,
        step_seconds=records[0]["step_seconds"],
        eval_loss=records[0]["eval_loss"],
        first_step_s=first_step,
        wall_s=wall,
        peak_gib_per_rank=[r.get("peak_cuda_allocated_gib", r["peak_rss_gib"]) for r in records],
        peak_cuda_reserved_gib_per_rank=[r["peak_cuda_reserved_gib"] for r in records] if args.cuda else None,
        batch_hashes=[r["batch_hashes"] for r in records],
    )


# ----- the two comparisons -----

GLOBAL_BATCH = 8  # examples per optimizer step in the like-for-like comparison, all ranks together
# Our cosine schedule ends at 10% of the peak (fsdpqlora/train/optim.py); transformers' cosine_with_min_lr
# with this floor and no warm-up is the same curve, step for step.
OUR_COSINE_FLOOR = 0.1


def like_for_like_overrides(args: argparse.Namespace) -> list[str]:
    if GLOBAL_BATCH % args.nproc:
        sys.exit(f"peers: --nproc {args.nproc} does not divide the global batch of {GLOBAL_BATCH} examples")
    return [
        "precision=fp32", "data.batching=padded", "data.seq_len=256",
        f"train.micro_batch_size={GLOBAL_BATCH // args.nproc}", "train.grad_accum_steps=1",
        # every decoder layer checkpointed, as the Trainer's gradient checkpointing does (not what the planner would pick)
        "adapter.r=16", "adapter.target_modules=[all-linear]", "shard.activation_checkpointing=true", "shard.checkpoint_every=1",
        # the whole model on every rank, only the adapter's gradients averaged: the Trainer's DDP
        "shard=no_shard",
        # transformers' warm-up starts from 0, ours from 1/(warmup+1): without warm-up both schedules are the same
        "train.schedule=cosine", "train.warmup_steps=0",
    ]  # fmt: skip


def recommended_overrides(args: argparse.Namespace, seed: list[str], tokens_per_step: float) -> list[str]:
    """Our defaults and the levers `fsdpqlora plan` proposes for them on this machine, at the job's
    batch size; on CPU the precision our demo runs with (CPUs without native bf16 are 10-20x slower in it)."""
    ours = ([] if args.cuda else ["precision=fp32"]) + seed
    ours += [f"train.micro_batch_size={packed_rows_per_rank(ours, tokens_per_step, args)}", "train.grad_accum_steps=1"]
    return ours + planner_levers(ours, args)


def packed_rows_per_rank(overrides: list[str], tokens_per_step: float, args: argparse.Namespace) -> int:
    """The job fixes the batch size: GLOBAL_BATCH examples per optimizer step. Packed, as many rows
    would hold more examples (here about 1.4 a row) and so make fewer, larger steps of the same
    tokens, which train less (0.01-0.02 higher evaluation loss when this was written); so ours gets
    the rows per rank whose real tokens per step come closest to those of the HF route's steps."""
    def real_tokens_per_step(rows: int) -> float:
        batches = our_batches([*overrides, f"train.micro_batch_size={rows}"], args.nproc, args.cache_dir, steps=args.steps)
        return statistics.mean(batches.step_tokens())

    return min(range(1, GLOBAL_BATCH // args.nproc + 1), key=lambda rows: abs(real_tokens_per_step(rows) - tokens_per_step))


def planner_levers(overrides: list[str], args: argparse.Namespace) -> list[str]:
    """The overrides `fsdpqlora plan` proposes for this run on this machine's workers (a replicated
    base where it fits, the checkpointing and micro-batches that are fastest)."""
    from fsdpqlora.config import compose_config
    from fsdpqlora.plan.arch import architecture, hf_config_of
    from fsdpqlora.plan.memory import Levers
    from fsdpqlora.plan.rig import measure
    from fsdpqlora.plan.search import changed_overrides, fastest_fitting

    cfg = compose_config([f"launch.cache_dir={hydra_path(args.cache_dir)}", *overrides])
    ranked = fastest_fitting(architecture(cfg, hf_config_of(cfg)), cfg, measure(cfg, args.nproc))
    return changed_overrides(Levers.of(cfg), ranked[0].levers) if ranked else []


def hf_settings(overrides: list[str], steps: int, args: argparse.Namespace, recommended: bool) -> dict:
    """The Hugging Face route's settings, taken from our configuration where both have the setting."""
    from transformers import AutoConfig

    from fsdpqlora import assets
    from fsdpqlora.config import compose_config
    from fsdpqlora.model.families import family_of

    cfg = compose_config([f"launch.cache_dir={hydra_path(args.cache_dir)}", *overrides])
    t, a = cfg.train, cfg.adapter
    family = family_of(AutoConfig.from_pretrained(assets.tiny_model_path(args.cache_dir)))
    settings = {
        "steps": steps, "world_size": args.nproc, "cuda": args.cuda, "parallel": "fsdp" if args.cuda else "ddp",
        "dtype": "bfloat16" if recommended and args.cuda else "float32",
        "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm, "seed": t.seed,
        "lora_r": a.r, "lora_alpha": a.alpha, "lora_dropout": a.dropout,
        "target_modules": list(family.linear_names) if list(a.target_modules) == ["all-linear"] else list(a.target_modules),
        # The rows in the order peers.py wrote them: ours for (a); for (b) the order of our padded
        # run, a seeded shuffle like the Trainer's own, which fixes the token budget up front.
        "sampling": "sequential",
    }  # fmt: skip
    if recommended:  # the job's batch, padded (ours packs its own rows), and the usual QLoRA recipe's schedule
        return {**settings, "micro_batch_size": GLOBAL_BATCH // args.nproc, "grad_accum_steps": 1,
                "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {}, "warmup_steps": 0.03}  # fmt: skip
    assert t.schedule == "cosine" and t.warmup_steps == 0
    return {**settings, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": OUR_COSINE_FLOOR},
            "warmup_steps": 0}  # fmt: skip


def check_like_for_like(batches: Batches, ours: RouteRun, hf: RouteRun) -> dict:
    """That both routes trained on the same micro-batches, and their losses agree; exits if not."""
    problems = []
    expected = batches.hashes()
    for rank, (want, got) in enumerate(zip(expected, hf.batch_hashes, strict=True)):
        if want != got:
            first = next((i for i, (w, g) in enumerate(zip(want, got, strict=False)) if w != g), min(len(want), len(got)))
            problems.append(f"rank {rank}: the Trainer's micro-batch {first} differs from ours ({len(got)} seen, {len(want)} expected)")
    if ours.step_tokens != batches.step_tokens() or ours.step_targets != batches.step_targets():
        problems.append("our run's tokens or target tokens per step differ from those of the batches computed here")
    differences = [abs(o - h) / abs(o) for o, h in zip(ours.losses, hf.losses, strict=True)]
    worst = max(range(len(differences)), key=differences.__getitem__)
    if differences[0] > STEP1_RELATIVE_TOLERANCE:
        problems.append(f"step 1 losses differ: {ours.losses[0]:.6f} against {hf.losses[0]:.6f} ({differences[0]:.2e} relative)")
    if differences[worst] > TRAJECTORY_RELATIVE_TOLERANCE:
        problems.append(f"step {worst + 1} losses differ by {differences[worst]:.1%}: {ours.losses[worst]:.4f} against {hf.losses[worst]:.4f}")
    if problems:
        sys.exit("peers: the routes did not train alike; refusing to time them:\n  " + "\n  ".join(problems))
    return {
        "micro_batches_identical_per_rank": len(expected[0]),
        "step1_losses": [ours.losses[0], hf.losses[0]],
        "step1_relative_difference": differences[0],
        "max_relative_difference": differences[worst],
        "max_abs_difference": max(abs(o - h) for o, h in zip(ours.losses, hf.losses, strict=True)),
        "at_step": worst + 1,
        "tolerances": {"step1_relative": STEP1_RELATIVE_TOLERANCE, "every_step_relative": TRAJECTORY_RELATIVE_TOLERANCE},
    }


def plan(args: argparse.Namespace) -> list[tuple[Comparison, Batches]]:
    """The comparisons to run, with the data each route gets, computed from our pipeline once."""
    seed = [] if args.seed is None else [f"train.seed={args.seed}"]
    like = like_for_like_overrides(args) + seed
    padded = our_batches(like, args.nproc, args.cache_dir, steps=args.steps)
    comparisons = []
    if args.only != "recommended":
        comparisons.append((Comparison("like-for-like", Route("fsdpqlora"), Route("HF Trainer"), like,
                                       hf_settings(like, args.steps, args, recommended=False), sum(padded.step_tokens())), padded))  # fmt: skip
    if args.only != "like-for-like":
        ours = recommended_overrides(args, seed, statistics.mean(padded.step_tokens()))
        budget = sum(our_batches(ours, args.nproc, args.cache_dir, steps=args.steps).step_tokens())
        theirs = our_batches(like, args.nproc, args.cache_dir, tokens=budget)
        settings = hf_settings(ours, theirs.steps, args, recommended=True)
        comparisons.append((Comparison("recommended defaults", Route("fsdpqlora"), Route("HF Trainer"), ours, settings, budget), theirs))
    return comparisons


def run_round(round_no: int, planned: list[tuple[Comparison, Batches]], work_dir: Path, args: argparse.Namespace) -> None:
    """One launch of each route of each comparison; the like-for-like pair is checked as soon as
    both have run (in the first round, before anything else runs)."""
    launches = [(c, b, route) for c, b in planned for route in ("fsdpqlora", "HF Trainer")]
    # Every other round in reverse order, so a drift in the machine's speed favours neither route.
    for comparison, batches, route in launches if round_no % 2 == 0 else launches[::-1]:
        if route == "fsdpqlora":
            run = run_ours(comparison.ours_overrides, args.steps, work_dir, args)
            if sum(run.step_tokens) != comparison.ours_tokens:  # the HF route's steps were sized from it
                sys.exit(f"peers: our {comparison.name} run trained {sum(run.step_tokens):,} real tokens; its batches computed "
                         f"here have {comparison.ours_tokens:,}: the benchmark no longer composes our run's configuration")  # fmt: skip
            comparison.ours.runs.append(run)
        else:
            run = run_hf(batches.hf_rows(), batches.eval_rows, comparison.hf_settings, work_dir, args)
            comparison.hf.runs.append(run)
        peaks = "/".join(f"{p:.2f}" for p in run.peak_gib_per_rank)
        print(f"[peers] round {round_no + 1}/{args.rounds}  {comparison.name:<20} {route:<10} {run.steady_tokens_per_s:6.0f} tokens/s  "
              f"first step {run.first_step_s:5.1f}s  peak {peaks} GiB  eval loss {run.eval_loss:.4f}  wall {run.wall_s:4.0f}s",
              flush=True)  # fmt: skip
        if comparison.name == "like-for-like" and len(comparison.ours.runs) == len(comparison.hf.runs):
            comparison.check = c = check_like_for_like(batches, comparison.ours.runs[-1], comparison.hf.runs[-1])
            print(f"[peers] checked: {c['micro_batches_identical_per_rank']} identical micro-batches per rank; step-1 loss "
                  f"{c['step1_losses'][0]:.6f} vs {c['step1_losses'][1]:.6f} ({c['step1_relative_difference']:.1e} relative); "
                  f"largest difference {c['max_relative_difference']:.2%} (step {c['at_step']})", flush=True)  # fmt: skip


# ----- reporting -----


def format_table(comparisons: list[Comparison], memory_kind: str) -> str:
    header = ("comparison", "route", "tokens/s", "spread", "ours/HF (min-max)", "first step s", f"peak {memory_kind} GiB/rank",
              "eval loss", "steps", "real tokens")  # fmt: skip
    rows = []
    for c in comparisons:
        ratios = c.ratios()
        for route in (c.ours, c.hf):
            s = route.summary()
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if route is c.ours else ""
            rows.append((c.name if route is c.ours else "", route.name, f"{s['tokens_per_s']:.0f}", f"{s['spread']:.0%}", ratio,
                         f"{s['first_step_s']:.1f}", " / ".join(f"{p:.2f}" for p in s["peak_gib_per_rank"]),
                         f"{s['eval_loss']:.4f}", str(s["steps"]), f"{s['real_tokens']:,}"))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def loss_table(comparison: Comparison, rows: int = 10) -> str:
    """The first round's training losses side by side at a few of our steps (the first three, then
    evenly spaced), each beside the HF step that reached as many real tokens: like for like the same
    step, with the same batch; with the recommended defaults the steps train other examples, so
    only the trend compares."""
    ours, hf = comparison.ours.runs[0], comparison.hf.runs[0]
    ours_seen, hf_seen = itertools.accumulate(ours.step_tokens), list(itertools.accumulate(hf.step_tokens))
    steps = len(ours.losses)
    shown = sorted({*range(1, min(3, steps) + 1), *(round(1 + i * (steps - 1) / (rows - 4)) for i in range(rows - 3))})
    lines = [f"{'real tokens':>11}  {'step':>5}  {'fsdpqlora':>9}  {'step':>5}  {'HF Trainer':>10}  {'difference':>10}"]
    for step, seen in zip(range(1, steps + 1), ours_seen, strict=True):
        if step in shown:
            hf_step = min(bisect.bisect_left(hf_seen, seen), len(hf_seen) - 1) + 1
            ours_loss, hf_loss = ours.losses[step - 1], hf.losses[hf_step - 1]
            lines.append(f"{seen:>11,}  {step:>5}  {ours_loss:9.4f}  {hf_step:>5}  {hf_loss:10.4f}  {ours_loss - hf_loss:+10.4f}")
    return "\n".join(lines)


def plot_losses(comparisons: list[Comparison], path: Path) -> Path | None:
    """The first round's training losses of both routes, per comparison, against real tokens trained."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, len(comparisons), figsize=(6 * len(comparisons), 4), squeeze=False)
    for axis, c in zip(axes[0], comparisons, strict=True):
        for route in (c.ours, c.hf):
            run = route.runs[0]
            seen = [sum(run.step_tokens[: i + 1]) for i in range(len(run.step_tokens))]
            axis.plot(seen, run.losses, label=f"{route.name} ({len(run.losses)} steps)")
        axis.set(title=c.name, xlabel="real tokens trained", ylabel="training loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_results(comparisons: list[Comparison], machine: dict, args: argparse.Namespace) -> Path:
    report = {
        "settings": {"model": "tiny", "data": "pydoc_qa", "rounds": args.rounds, "steps": args.steps, "workers": args.nproc,
                     "warmup_steps_excluded": WARMUP_STEPS, "hf_parallel": "fsdp" if args.cuda else "ddp"},  # fmt: skip
        "definitions": {
            "tokens_per_s": "real (non-padding) tokens per second of training, median over every run's steps, the first "
            f"{WARMUP_STEPS} of each left out",
            "spread": "(max - min) of the per-run medians, relative to tokens_per_s",
            "ratio": "fsdpqlora / HF Trainer tokens/s, per round; median and range",
            "first_step_s": "from starting the launcher (torchrun, accelerate launch) to the end of the first step; median",
            "peak_gib_per_rank": "max over runs of each rank's peak: host RSS on CPU, CUDA memory allocated with --cuda",
            "eval_loss": "mean next-token loss over every target token of the held-out examples (the same for both "
            "routes), after the last step",
        },
        "comparisons": [
            {
                "name": c.name,
                "ratio_median": statistics.median(c.ratios()),
                "ratio_min": min(c.ratios()),
                "ratio_max": max(c.ratios()),
                "check": c.check,
                "fsdpqlora": {"overrides": c.ours_overrides, **c.ours.summary(), "runs": [asdict(r) for r in c.ours.runs]},
                "hf_trainer": {"settings": c.hf_settings, **c.hf.summary(), "runs": [asdict(r) for r in c.hf.runs]},
            }
            for c in comparisons
        ],
    }
    return save_report("peers", report, machine, args.tag)


def refuse_without_hf_pieces() -> None:
    missing = [name for name in HF_PIECES if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"peers: the Hugging Face route needs {', '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        from importlib.metadata import version

        sys.exit(f"peers: transformers {version('transformers')} has no TrainingArguments.train_sampling_strategy, "
                 "which feeds the Trainer our example order; it needs transformers 5")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, each one run of every route (default 3)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of each run of ours (default 120)")
    parser.add_argument("--cuda", action="store_true", help="on GPUs (one per process): NCCL, accelerate's FSDP on the HF side")
    parser.add_argument("--only", choices=["like-for-like", "recommended"], default=None, help="run one of the two comparisons")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of both routes (default: ours); it also draws "
                        "the held-out examples")
    add_common_arguments(parser, workers="processes per route")
    args = parser.parse_args(argv)
    check_steps(parser, args.steps)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_without_hf_pieces()
    if args.cuda:
        import torch

        if torch.cuda.device_count() < args.nproc:
            sys.exit(f"peers: --cuda needs a GPU per process: {args.nproc} processes, {torch.cuda.device_count()} GPUs")
    machine = describe_machine(workers=args.nproc, omp_num_threads=omp_threads(args.nproc),
                               accelerate=importlib.metadata.version("accelerate"))  # fmt: skip
    planned = plan(args)
    print(f"[peers] {len(planned)} comparisons x 2 routes x {args.rounds} rounds, {args.steps} steps of ours each, "
          f"{args.nproc} processes, {machine['cpu_cores']} cores ({machine['cpu_model']}), torch {machine['torch']}, "
          f"transformers {machine['transformers']}, peft {machine['peft']}, accelerate {machine['accelerate']}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fsdpqlora-peers-") as work_dir:
        for round_no in range(args.rounds):
            run_round(round_no, planned, Path(work_dir), args)
    comparisons = [c for c, _ in planned]
    print("\n" + format_table(comparisons, "CUDA allocated" if args.cuda else "host RSS"))
    for c in comparisons:
        same = "the same batch at each step" if c.name == "like-for-like" else "other examples at each step: compare the trend"
        print(f"\ntraining losses, {c.name}, round 1 ({same}):\n{loss_table(c)}")
    if not args.no_save:
        path = save_results(comparisons, machine, args)
        print(f"\n[peers] results: {path}")
        if plot := plot_losses(comparisons, path.with_suffix(".png")):
            print(f"[peers] losses: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
