"""From a command line (or a saved file) to the typed configuration, and back to YAML.

Hydra composes conf/config.yaml with the overrides against the schema; the result becomes the
schema's dataclass objects once, here (`OmegaConf.to_object`), and everything downstream reads
typed attributes. Every way a configuration comes in (overrides, a run's config.yaml, a
checkpoint's meta.json) goes through `config_from`, so all are checked against the schema alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fsdpqlora.config.schema import Config
from fsdpqlora.errors import ConfigError

# conf/ sits at the top of the repository and is installed as the package `fsdpqlora.conf`
# (see pyproject.toml), so one lookup finds it in a source checkout and in an installed wheel.
CONF_DIR = Path(str(importlib.resources.files("fsdpqlora.conf")))

ConfigStore.instance().store(name="fsdpqlora_schema", node=Config)


def config_from(values: Any, source: str = "") -> Config:
    """The typed configuration of `values` (a container or an OmegaConf node) merged into the
    schema's defaults: unknown keys, wrong types and unknown choices are refused, naming the key
    (and `source`, the file they came from, when given)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_one_line(exc)}" if source else _one_line(exc)) from None


def compose_config(overrides: list[str]) -> Config:
    """Compose conf/config.yaml with command-line overrides, checked against the schema."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from None
    # Merging into the schema once more refuses top-level keys that `+key=value` slipped in.
    return config_from(OmegaConf.to_container(composed))


def load_config_file(path: str | Path) -> Config:
    """Load a resolved config written by `save_run_config`, checked against the schema again."""
    try:
        values = OmegaConf.load(path)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_one_line(exc)}") from None
    return config_from(values, str(path))


def to_dict(cfg) -> dict:
    """A configuration (or one section) as plain containers, choices as their names: what a
    checkpoint records, wandb shows, and caches key on."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_run_config(cfg: Config, run_dir: Path) -> Path:
    """Write the resolved config, with its run directory filled in, as <run_dir>/config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    config_file.write_text(to_yaml(replace(cfg, launch=replace(cfg.launch, run_dir=str(run_dir)))))
    return config_file


def choose_run_dir(cfg: Config) -> Path:
    """launch.run_dir when given, else a new timestamped directory under launch.output_root."""
    if cfg.launch.run_dir:
        return Path(cfg.launch.run_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return (Path(cfg.launch.output_root).expanduser() / stamp).resolve()


def _one_line(exc: BaseException) -> str:
    """Hydra wraps OmegaConf's precise error (which names the key) in a vaguer one; report the
    precise one, in one line, as `key: problem`."""
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    message = lines[0] if lines else type(cause).__name__
    key = getattr(cause, "full_key", None)
    wrong_choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", message)
    if key and wrong_choice:
        value, choices = wrong_choice.groups()
        return f"{key}={value!r}: must be one of {choices}"
    if key and not message.startswith(key):
        message = f"{key}: {message}"
    if type(cause).__name__ == "OverrideParseException" or "LexerNoViableAltException" in message:
        # Hydra keeps the override it refused, where the message may not show it (braces of a template).
        override = getattr(cause, "override", None) or message.split(": ", 1)[-1]
        key = override.split("=", 1)[0]
        message = (
            f"{override}: Hydra cannot parse this override; quote the value, "
            f"e.g. '{key}=\"{override.split('=', 1)[-1]}\"' (with the single quotes, for the shell)"
        )
    missing_option = re.match(r"In '.*': Could not find '(\w+)/(.*)'", message)
    if missing_option:
        group, option = missing_option.groups()
        options = list(preset_options(group))
        message = f"{group}={option}: no such option; choose one of {', '.join(options)}{_did_you_mean(option, options)}"
    elif key and "not in '" in message:  # an unknown key
        message += _did_you_mean(key, schema_keys())
    return message


def _did_you_mean(typed: str, known: list[str]) -> str:
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def schema_keys(node=Config, prefix: str = "") -> list[str]:
    """Every key of the schema, dotted (`train`, `train.lr`, ...)."""
    keys = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys += schema_keys(f.default_factory, key + ".")
    return keys


def config_groups() -> list[str]:
    """The groups of conf/ whose presets the command line picks (`model=...`)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def preset_options(group: str) -> dict[str, str]:
    """A group's presets, each with the first sentence of its file's leading comment."""
    return {path.stem: _first_sentence(path) for path in sorted((CONF_DIR / group).glob("*.yaml"))}


def _first_sentence(path: Path) -> str:
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            comment.append(line.lstrip("# ").strip())
    text = " ".join(comment)
    match = re.match(r"(.+?\.)(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= 120 else sentence[:117].rsplit(" ", 1)[0] + " ..."
