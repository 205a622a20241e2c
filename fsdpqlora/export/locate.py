"""Finding what a run produced, for the commands that use it (merge, generate): a run directory, a
checkpoint directory, an adapter directory, or a merged model directory, with the configuration
the run was trained with and the base model the adapter belongs to."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from fsdpqlora.config import Config
from fsdpqlora.errors import ConfigError, ModelFilesError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# An adapter directory that holds a tokenizer (training saves it there, with the chat template it used).
TOKENIZER_CONFIG = "tokenizer_config.json"
# A merged model directory carries the configuration of the run it came from, so that `generate`
# formats prompts as that run's training did.
RUN_CONFIG_COPY = "fsdpqlora_config.yaml"


@dataclass
class Trained:
    cfg: Config  # the run's configuration, or the schema's defaults when none was found
    cfg_file: Path | None  # where it was read from
    model_dir: Path  # the base model (or the merged model when adapter_dir is None)
    adapter_dir: Path | None


def locate(path: str | Path, base: str | None = None, need_adapter: bool = False) -> Trained:
    """Resolve PATH: a run directory (config.yaml + adapter/), a checkpoint directory (meta.json +
    adapter/), an adapter directory (adapter_config.json), or, unless `need_adapter`, a model
    directory (config.json). `base` replaces the base model the run or adapter names."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelFilesError(f"{path}: no such directory")
    adapter_dir = path / "adapter" if (path / "adapter").is_dir() else path
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        cfg, cfg_file = _run_config(adapter_dir.parent)
        if cfg_file is None:
            cfg = Config()
        adapter_dir = adapter_dir.resolve()
        for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (adapter_dir / required).is_file():
                raise ModelFilesError(f"{adapter_dir / required}: missing; an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        return Trained(cfg, cfg_file, _base_dir(cfg, cfg_file, adapter_dir, base), adapter_dir)
    checkpoints = sorted(c for c in path.glob("checkpoints/step-*") if (c / "meta.json").is_file())
    if checkpoints and not (path / "config.json").is_file():  # a run stopped before its end
        raise ModelFilesError(f"{path}: the run has not finished, so it has no adapter/ yet; its newest checkpoint "
                              f"holds the adapter so far: {checkpoints[-1]}")  # fmt: skip
    if need_adapter or not (path / "config.json").is_file():
        what = "a run directory, a checkpoint directory or an adapter directory" if need_adapter else "a run, checkpoint, adapter or model directory"
        raise ModelFilesError(f"{path}: not {what} (no adapter/ or {ADAPTER_CONFIG}" + ("" if need_adapter else ", no config.json") + ")")
    cfg, cfg_file = _run_config(path)
    return Trained(cfg if cfg_file else Config(), cfg_file, path.resolve(), None)


def _run_config(directory: Path) -> tuple[Config | None, Path | None]:
    """The run's configuration in `directory`: config.yaml (a run directory), meta.json (a
    checkpoint), or the copy a merged model directory carries."""
    from fsdpqlora.config import config_from, load_config_file

    for name in ("config.yaml", RUN_CONFIG_COPY):
        if (directory / name).is_file():
            return load_config_file(directory / name), directory / name
    meta = directory / "meta.json"
    if meta.is_file():
        try:
            values = json.loads(meta.read_text())["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{meta}: no usable configuration ({exc})") from None
        return config_from(values, str(meta)), meta
    return None, None


def _base_dir(cfg: Config, cfg_file: Path | None, adapter_dir: Path, base: str | None) -> Path:
    """The base model's directory: --base, else the run's model, else what the adapter names."""
    from fsdpqlora.model.directory import resolve_model_dir

    if base is None and cfg_file is not None:
        return resolve_model_dir(cfg)
    if base is None:
        try:
            base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as exc:
            raise ModelFilesError(f"{adapter_dir / ADAPTER_CONFIG}: not valid JSON ({exc})") from None
        if not base:
            raise ModelFilesError(f"{adapter_dir / ADAPTER_CONFIG}: names no base_model_name_or_path; pass --base PATH")
        origin = f"the base model {base!r} named in {adapter_dir / ADAPTER_CONFIG}"
    else:
        origin = f"--base {base}"
    try:
        return resolve_model_dir(replace(cfg, model=replace(cfg.model, name="base", path=base)))
    except ModelFilesError as exc:
        raise ModelFilesError(f"{origin}: {str(exc).split(': ', 1)[-1]}") from None
