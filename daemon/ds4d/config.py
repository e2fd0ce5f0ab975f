"""Where things live: the optional config file, the model path, and the cache/state directories.

Owns the resolution rules of DESIGN.md ("Configuration and paths"): `--model`, `$DS4_MODEL`, the config file's
`model`, `./ds4flash.gguf`, `$XDG_DATA_HOME/ds4/ds4flash.gguf`; when none exists the caller may fall back to the
demo model generated once into `$XDG_CACHE_HOME/ds4/`. Reads `$XDG_CONFIG_HOME/ds4/config.toml` with tomllib:
`model`, and defaults for `ds4d serve` under the names of its options (`ctx`, `cache_dir`, `backend`, ...
type-checked by `config_value`). Does not open models (that is `open_model`) and does not parse command lines
(`cli.py`).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "ds4flash.gguf"
DEMO_SEED = 4
DEMO_VARIANT = "q2"


class ConfigError(Exception):
    """A bad config file or setting; str(e) is one line for the user."""


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "ds4"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "ds4"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "ds4"


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "ds4"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The config file's table, or {} when there is none."""
    path = path or config_dir() / "config.toml"
    if not path.exists():
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve_model(explicit: str | None, config: dict[str, Any] | None = None) -> Path | None:
    """The model file to use, or None when no candidate exists (the caller then offers the demo model)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("DS4_MODEL")
    if env:
        return Path(env).expanduser()
    configured = (config or {}).get("model")
    if configured:
        return Path(str(configured)).expanduser()
    for candidate in (Path.cwd() / DEFAULT_MODEL_NAME, data_dir() / DEFAULT_MODEL_NAME):
        if candidate.exists():
            return candidate
    return None


def demo_model_path() -> Path:
    return cache_dir() / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}.gguf"


def log_path() -> Path:
    """The daemon's log file."""
    return state_dir() / "ds4d.log"


def config_value(config: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """A setting from the config file, type-checked (e.g. `ctx = 65536`), or `default` when it is absent."""
    if key not in config:
        return default
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = {int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"{config_dir() / 'config.toml'}: {key} must be {' or '.join(names[k] for k in kinds)}, "
                          f"not {value!r}")
    return value
