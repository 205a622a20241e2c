"""Host memory and time to load a checkpoint into the 4-bit model, as the checkpoint grows.

    .venv/bin/python benchmarks/loading.py                          # 0.1, 0.5, 1 and 2 billion parameters
    .venv/bin/python benchmarks/loading.py --sizes 0.1 0.5 --checkpoints /data/synthetic --tag my-box

For each size a synthetic checkpoint of the Llama architecture (random bf16 weights, sharded into
safetensors files of at most 1 GiB with an index, as the hub ships them) is written once, then
loaded, in the same invocation:

- by fsdpqlora: 2 torchrun workers (gloo on CPU, NCCL on GPUs), each building the meta skeleton,
  sharding it with FSDP2 and streaming the files tensor by tensor into its shards (both load modes);
- by transformers: `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))`,
  one process, `device_map` on the same device: what each rank of the Hugging Face route runs.

Each process reports its peak RSS (ru_maxrss), its RSS before loading began (interpreter,
libraries, process group), and the bytes of the model it holds afterwards (its parameters and
buffers: on CPU they live in host memory, on a GPU they do not). The loading overhead is
peak - before - (those bytes in host memory): what loading costs beyond holding the result.
That is the number that must not grow with the model; the rest is the model itself. It is checked
against a bound that depends only on the largest tensors: (model.load_workers + 1) x the largest
piece a rank reads at once (a 4-bit weight whole; of a 16-bit tensor, its own rows), plus, on CPU
only, bitsandbytes' quantizer temporaries for the largest 4-bit weight (measured at the start).

Results are printed as a table with ratios against transformers, followed by the extrapolation
to Llama-3.1-70B, and written to benchmarks/results/loading-<tag>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from report import children_cpu_seconds, describe_machine, machine_busy_seconds, save_report

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MAX_FILE_BYTES = GIB

# Llama-architecture shapes for the synthetic checkpoints, by (approximate) size in billions.
SHAPES: dict[str, dict] = {
    "0.1": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
    "0.5": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4),
    "1": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4),
    "2": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4),
}
VOCAB = 32000
# The target of the extrapolation.
LLAMA_31_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    vocab_size=128256,
)  # fmt: skip


def tensor_shapes(shape: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint with these dimensions, in the order transformers saves them."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    tensors = {"model.embed_tokens.weight": (vocab, h)}
    for n in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{n}"
        tensors.update({
            f"{prefix}.input_layernorm.weight": (h,),
            f"{prefix}.self_attn.q_proj.weight": (h, h),
            f"{prefix}.self_attn.k_proj.weight": (kv, h),
            f"{prefix}.self_attn.v_proj.weight": (kv, h),
            f"{prefix}.self_attn.o_proj.weight": (h, h),
            f"{prefix}.post_attention_layernorm.weight": (h,),
            f"{prefix}.mlp.gate_proj.weight": (i, h),
            f"{prefix}.mlp.up_proj.weight": (i, h),
            f"{prefix}.mlp.down_proj.weight": (h, i),
        })  # fmt: skip
    tensors["model.norm.weight"] = (h,)
    tensors["lm_head.weight"] = (vocab, h)
    return tensors


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(out: Path, shape: dict) -> Path:
    """A random bf16 Llama checkpoint, file by file, so writing it never holds more than one file."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from fsdpqlora.assets import train_tokenizer

    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = train_tokenizer(tmp, vocab_size=512)  # the tokenizer is not measured; any will do
    LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape).save_pretrained(tmp)  # fmt: skip
    shapes = tensor_shapes(shape, VOCAB)
    files: list[list[str]] = [[]]
    size = 0
    for name, s in shapes.items():
        nbytes = numel(s) * 2
        if files[-1] and size + nbytes > MAX_FILE_BYTES:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, names in enumerate(files, start=1):
        file = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        del tensors
    total = sum(numel(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    os.rename(tmp, out)
    return out


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_bytes(model) -> tuple[int, int]:
    """(bytes of the model this process holds: its parameters and buffers, and the quantization
    state of its 4-bit layers; the part of them in host memory)."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.quant_state if module.quant_state is not None else module.weight.quant_state
            tensors += [t for t in state.as_dict().values() if hasattr(t, "data_ptr")]
    total = host = 0
    seen = set()
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        nbytes = local.numel() * local.element_size()
        total += nbytes
        if local.device.type == "cpu":
            host += nbytes
    return total, host


def import_model_code() -> None:
    """Import what building the model imports, so that `before` holds the libraries and the
    overhead measures loading alone."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


@dataclass
class Load:
    """One process's load of one checkpoint."""

    seconds: float
    rss_before_gib: float
    peak_rss_gib: float
    model_gib: float  # parameters + buffers this process holds after loading
    model_on_host_gib: float
    overhead_gib: float  # peak - before - model bytes in host memory
    peak_device_gib: float | None


def worker_fsdpqlora(model_dir: Path, mode: str, out: Path) -> None:
    """Runs under torchrun: load with fsdpqlora, report this rank's Load as JSON."""
    import torch
    import torch.distributed as dist

    from fsdpqlora.config import compose_config
    from fsdpqlora.model.build import build_model
    from fsdpqlora.parallel.process_group import init_distributed

    d = init_distributed()
    cfg = compose_config(["model.name=bench", f"model.path={model_dir}", f"model.load_mode={mode}"])
    import_model_code()
    dist.barrier()
    before = rss_gib()
    started = time.perf_counter()
    built = build_model(cfg, d, model_dir)
    seconds = time.perf_counter() - started
    total, host = model_bytes(built.model)
    peak = peak_rss_gib()
    device_peak = torch.cuda.max_memory_allocated(d.device) / GIB if d.device.type == "cuda" else None
    load = Load(seconds, before, peak, total / GIB, host / GIB, peak - before - host / GIB, device_peak)
    (out.parent / f"{out.name}.rank{d.rank}").write_text(json.dumps(asdict(load)))
    dist.barrier()
    dist.destroy_process_group()


def worker_transformers(model_dir: Path, out: Path) -> None:
    """One process: transformers + BitsAndBytesConfig, as each rank of the Hugging Face route loads."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    import_model_code()
    before = rss_gib()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map=device)
    seconds = time.perf_counter() - started
    total, host = model_bytes(model)
    peak = peak_rss_gib()
    device_peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    out.write_text(json.dumps(asdict(Load(seconds, before, peak, total / GIB, host / GIB, peak - before - host / GIB, device_peak))))


@dataclass
class SizeResult:
    size: str
    parameters: int
    checkpoint_gib: float
    largest_tensor_gib: float
    largest_read_gib: float  # the most one rank reads of one tensor (see largest_read)
    overhead_bound_gib: float  # what every_rank's overhead must stay under (see overhead_bound)
    ours: dict[str, list[Load]]  # load mode -> one Load per rank
    transformers: Load
    other_cpu_cores: float


def run(command: list[str], env: dict) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")


def measure(size: str, model_dir: Path, modes: list[str], nproc: int, work: Path, bound: float) -> SizeResult:
    shapes = tensor_shapes(SHAPES[size], VOCAB)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)), PYTHONPATH=str(REPO))
    busy, ours_cpu, started = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    ours = {}
    for mode in modes:
        out = work / f"ours-{size}-{mode}.json"
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
             __file__, "--worker", "fsdpqlora", str(model_dir), mode, str(out)], env)  # fmt: skip
        ours[mode] = [Load(**json.loads((work / f"{out.name}.rank{r}").read_text())) for r in range(nproc)]
    out = work / f"transformers-{size}.json"
    run([sys.executable, __file__, "--worker", "transformers", str(model_dir), "-", str(out)], dict(env, OMP_NUM_THREADS=str(os.cpu_count() or 1)))
    hf = Load(**json.loads(out.read_text()))
    elapsed = time.perf_counter() - started
    return SizeResult(
        size=size,
        parameters=sum(numel(s) for s in shapes.values()),
        checkpoint_gib=sum(numel(s) * 2 for s in shapes.values()) / GIB,
        largest_tensor_gib=max(numel(s) * 2 for s in shapes.values()) / GIB,
        largest_read_gib=largest_read(shapes, nproc) / GIB,
        overhead_bound_gib=bound,
        ours=ours,
        transformers=hf,
        other_cpu_cores=max(0.0, (machine_busy_seconds() - busy) - (children_cpu_seconds() - ours_cpu)) / elapsed,
    )


def format_table(results: list[SizeResult]) -> str:
    header = ("params", "ckpt GiB", "read at once GiB", "loader", "peak RSS/proc", "model in RAM", "overhead", "bound", "load s", "peak vs HF")
    rows = []
    for r in results:
        hf = r.transformers
        rows.append((f"{r.parameters / 1e9:.2f}B", f"{r.checkpoint_gib:.2f}", f"{r.largest_read_gib:.3f}", "transformers (1 proc)",
                     f"{hf.peak_rss_gib:.2f}", f"{hf.model_on_host_gib:.2f}", f"{hf.overhead_gib:.2f}", "", f"{hf.seconds:.1f}", "1.00x"))  # fmt: skip
        for mode, ranks in r.ours.items():
            peak = max(x.peak_rss_gib for x in ranks)
            rows.append(("", "", "", f"fsdpqlora {mode} (max of {len(ranks)} ranks)", f"{peak:.2f}",
                         f"{max(x.model_on_host_gib for x in ranks):.2f}", f"{max(x.overhead_gib for x in ranks):.2f}",
                         f"{r.overhead_bound_gib:.2f}" if mode == "every_rank" else "",
                         f"{max(x.seconds for x in ranks):.1f}", f"{peak / hf.peak_rss_gib:.2f}x"))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i not in (3,) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def largest_read(shapes: dict[str, tuple[int, ...]], nproc: int) -> int:
    """Bytes of the largest piece one rank reads at once: a 4-bit linear's weight whole (its
    quantization state needs every value), a 16-bit tensor (embedding, head) only its 1/nproc rows."""
    kept_16bit = max(numel(s) * 2 for name, s in shapes.items() if not name.endswith("proj.weight"))
    return max(largest_4bit(shapes), -(-kept_16bit // nproc))


def largest_4bit(shapes: dict[str, tuple[int, ...]]) -> int:
    return max(numel(s) * 2 for name, s in shapes.items() if name.endswith("proj.weight"))


def load_workers_default() -> int:
    from fsdpqlora.config import ModelConfig

    return ModelConfig().load_workers


def cpu_quantize_factor(shape: tuple[int, ...]) -> float:
    """Peak host memory of bitsandbytes' CPU quantizer per byte of the bf16 weight it quantizes,
    measured here (its CPU path computes in fp32 through several whole-tensor temporaries; on CUDA
    a fused kernel quantizes on the GPU, and none of this touches host memory)."""
    import threading

    import bitsandbytes as bnb
    import torch

    def statm_rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    peaks = []
    for _ in range(3):
        base, peak, done = statm_rss(), [0], threading.Event()

        def sample(base=base, peak=peak, done=done):
            while not done.is_set():
                peak[0] = max(peak[0], statm_rss() - base)
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        packed, state = bnb.functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
        done.set()
        sampler.join()
        del packed, state
        peaks.append(peak[0])
    return max(peaks) / (weight.numel() * 2)


def overhead_bound(shapes: dict[str, tuple[int, ...]], nproc: int, workers: int, quantize_factor: float) -> float:
    """GiB a rank needs beyond the model while loading: up to `workers` pieces read ahead plus the
    one in hand, and the quantizer's temporaries for the largest 4-bit weight (0 on a GPU)."""
    return ((workers + 1) * largest_read(shapes, nproc) + quantize_factor * largest_4bit(shapes)) / GIB


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - slope * mx, slope


def extrapolate(results: list[SizeResult], nproc: int, workers: int, quantize_factor: float) -> dict:
    """Peak host RSS per rank for Llama-3.1-70B on `nproc` GPUs. Ours: the process before loading
    plus the overhead bound, which the measurements at every size must stay under (checked and
    reported); the loaded shards sit on the GPUs, and so does quantization. transformers: its
    overhead, fitted as a line against the parameter count, since it grows with the model."""
    shapes = tensor_shapes(LLAMA_31_70B, LLAMA_31_70B["vocab_size"])
    params = sum(numel(s) for s in shapes.values())
    before = max(x.rss_before_gib for r in results for ranks in r.ours.values() for x in ranks)
    gpu_bound = overhead_bound(shapes, nproc, workers, quantize_factor=0.0)
    cpu_bound = overhead_bound(shapes, nproc, workers, quantize_factor)
    projection = {
        "llama_3_1_70b_parameters": params,
        "largest_read_gib": largest_read(shapes, nproc) / GIB,
        "largest_4bit_weight_gib": largest_4bit(shapes) / GIB,
        "rss_before_loading_gib": before,
        "fsdpqlora_peak_rss_per_rank_gib_on_gpus": before + gpu_bound,
        "fsdpqlora_peak_rss_per_rank_gib_on_cpu": before + cpu_bound,
        "measured_within_bound": all(max(x.overhead_gib for x in r.ours["every_rank"]) <= r.overhead_bound_gib
                                     for r in results if "every_rank" in r.ours),  # fmt: skip
    }
    arithmetic = (
        f"fsdpqlora per rank, on GPUs: RSS before loading {before:.2f} GiB + ({workers} read ahead + 1) x largest "
        f"piece read at once ({projection['largest_read_gib']:.2f} GiB: 1/{nproc} of the bf16 embedding; a 4-bit "
        f"weight is {projection['largest_4bit_weight_gib']:.2f} GiB) = {before + gpu_bound:.1f} GiB whatever the depth "
        f"(on CPU ranks + {quantize_factor:.1f} x the largest 4-bit weight for the quantizer = {before + cpu_bound:.1f} GiB)"
    )
    if len(results) >= 2:
        ha, hb = line_fit([r.parameters / 1e9 for r in results], [r.transformers.overhead_gib for r in results])
        projection["transformers_overhead_fit"] = {"intercept_gib": ha, "gib_per_billion_parameters": hb}
        projection["transformers_overhead_gib_per_process"] = ha + hb * params / 1e9
        arithmetic += (
            f". transformers, per process: overhead {ha:.2f} GiB + {hb:.2f} GiB per billion parameters x "
            f"{params / 1e9:.1f}B = {ha + hb * params / 1e9:.0f} GiB, on top of the 4-bit model it then holds"
        )
    projection["arithmetic"] = arithmetic
    return projection


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="checkpoint sizes (billions)")
    parser.add_argument("--modes", nargs="+", default=["every_rank", "rank0_broadcast"], choices=["every_rank", "rank0_broadcast"])
    parser.add_argument("--nproc", type=int, default=2, help="fsdpqlora ranks (default 2)")
    parser.add_argument("--checkpoints", default=None, help="directory to write (and reuse) the synthetic checkpoints in; default: a temporary one")
    parser.add_argument("--tag", default=None, help="machine tag in the results file name")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "MODEL_DIR", "MODE", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, model_dir, mode, out = args.worker
        if kind == "fsdpqlora":
            worker_fsdpqlora(Path(model_dir), mode, Path(out))
        else:
            worker_transformers(Path(model_dir), Path(out))
        return 0
    machine = describe_machine(workers=args.nproc)
    workers = load_workers_default()
    # The workers quantize on the GPU where there is one; on CPU, bitsandbytes' quantizer needs
    # host memory for its temporaries, measured here on the largest 4-bit weight of the largest size.
    on_gpu = machine["cuda_used"]
    biggest = max(args.sizes, key=float)
    largest_shape = max((s for n, s in tensor_shapes(SHAPES[biggest], VOCAB).items() if n.endswith("proj.weight")), key=numel)
    quantize_factor = 0.0 if on_gpu else cpu_quantize_factor(largest_shape)
    print(f"[benchmark] bitsandbytes' CPU quantizer: peak {quantize_factor:.1f} x the bf16 weight in host memory", flush=True)
    keep = Path(args.checkpoints).expanduser() if args.checkpoints else None
    root = keep or Path(tempfile.mkdtemp(prefix="fsdpqlora-load-bench-"))
    results = []
    try:
        for size in args.sizes:
            print(f"[benchmark] {size}B: writing the checkpoint (once)", flush=True)
            model_dir = write_checkpoint(root / f"llama-{size}b", SHAPES[size])
            print(f"[benchmark] {size}B: loading with fsdpqlora ({', '.join(args.modes)}) and transformers", flush=True)
            bound = overhead_bound(tensor_shapes(SHAPES[size], VOCAB), args.nproc, workers, quantize_factor)
            results.append(measure(size, model_dir, args.modes, args.nproc, root, bound))
            print(format_table(results[-1:]), flush=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + format_table(results))
    projection = extrapolate(results, args.nproc, workers, quantize_factor)
    print(f"\n[benchmark] every_rank overhead within its bound at every size: {projection['measured_within_bound']}")
    print(f"[benchmark] Llama-3.1-70B, {args.nproc} ranks: {projection['arithmetic']}")
    if not args.no_save:
        report = {
            "settings": {"sizes": args.sizes, "modes": args.modes, "nproc": args.nproc, "architecture": "llama", "dtype": "bfloat16"},
            "definitions": {
                "peak_rss_gib": "ru_maxrss of the process",
                "rss_before_gib": "VmRSS just before loading began (interpreter, libraries, process group)",
                "model_on_host_gib": "bytes of the parameters and buffers the process holds in host memory after loading",
                "overhead_gib": "peak - before - model_on_host: what loading costs beyond holding its result",
                "overhead_bound_gib": "(load_workers + 1) x largest piece one rank reads + CPU quantizer factor x largest 4-bit weight",
                "cpu_quantize_factor": quantize_factor,
            },
            "results": [asdict(r) for r in results],
            "extrapolation": projection,
        }
        print(f"[benchmark] results: {save_report('loading', report, machine, args.tag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
