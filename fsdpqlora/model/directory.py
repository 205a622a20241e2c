"""The model directory: where its files are (the built-in tiny model, a local directory, or a hub
id downloaded), its config.json, its tokenizer, and the 4-bit settings of a pre-quantized one."""

from __future__ import annotations

import json
from pathlib import Path

from fsdpqlora import assets
from fsdpqlora.config import Config, shown
from fsdpqlora.errors import ConfigError, ModelFilesError


def resolve_model_dir(cfg: Config, weights: bool = True) -> Path:
    """The local directory holding the model's files: built for `tiny`, a local path as given, or a
    hub id downloaded (safetensors and configs only; without `weights`, configs and tokenizer only)
    where a network exists."""
    if cfg.model.name == "tiny" and not cfg.model.path:
        return assets.tiny_model_path(cfg.launch.cache_dir)
    local = Path(cfg.model.path).expanduser()
    if local.is_dir():
        return local.resolve()
    if not is_hub_id(cfg.model.path):
        raise ModelFilesError(f"model.path={cfg.model.path!r}: no such directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer*", "*.model", *(["model*.safetensors"] if weights else [])]
    try:
        return Path(snapshot_download(cfg.model.path, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise ModelFilesError(
            f"model.path={cfg.model.path!r}: not a local directory, and the hub download failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None


def is_hub_id(path: str) -> bool:
    """Whether model.path names a hub repository (owner/name) rather than a local directory."""
    local = Path(path).expanduser()
    looks_local = local.is_dir() or local.is_absolute() or path.startswith((".", "~"))
    return bool(path) and not looks_local and path.count("/") == 1


def load_hf_config(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(f"{config_file}: missing; a model directory needs config.json")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{config_file}: not valid JSON ({exc})") from None
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        message = str(exc).splitlines()[0]
        if "custom code" in message and not trust_remote_code:
            message = (
                "the model's config names custom code (auto_map), which fsdpqlora does not run unless "
                "model.trust_remote_code=true; read that code first"
            )
        raise ModelFilesError(f"{config_file}: {message}") from None


def check_tokenizer(model_dir: Path):
    """The model directory's tokenizer, which training needs an EOS token from."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{model_dir}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.eos_token_id is None:
        raise ModelFilesError(f"{model_dir}: the tokenizer has no EOS token; responses could not end")
    return tokenizer


def prequantized_config(hf_config) -> dict | None:
    """The bitsandbytes 4-bit settings a pre-quantized checkpoint was saved with, or None."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        method = qc.get("quant_method", "unknown")
        raise ModelFilesError(
            f"config.json: the checkpoint is quantized with {method}"
            + (" 8-bit" if qc.get("load_in_8bit") else "")
            + "; fsdpqlora loads full-precision checkpoints and bitsandbytes 4-bit ones"
        )
    return qc


def check_prequantized(cfg: Config, hf_config, model_dir: Path) -> None:
    """A pre-quantized checkpoint fixes the 4-bit format; the configuration must agree with it
    (merging and reloading the adapter later go by the configuration)."""
    qc = prequantized_config(hf_config)
    if qc is None:
        return
    saved = {
        "quant_type": qc.get("bnb_4bit_quant_type", "fp4"),
        "double_quant": bool(qc.get("bnb_4bit_use_double_quant", False)),
    }
    for name, value in saved.items():
        configured, key = getattr(cfg.quant, name), f"quant.{name}"
        if configured != value:
            raise ConfigError(
                f"{key}={shown(configured)!r}: the checkpoint in {model_dir} is pre-quantized with {value}; set {key}={value}"
            )
