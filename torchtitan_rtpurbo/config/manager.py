"""Load a JobConfig from TOML and `--section.key value` command-line overrides.

Precedence: command line > TOML > dataclass defaults. Unknown sections or keys and values of the wrong
type raise ConfigError naming the key and where it came from (the TOML file or the command line).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from torchtitan_rtpurbo.config.job_config import JobConfig


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert `value` to the field type `typ`. Strings (from the CLI) are parsed."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item_t,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_t, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {typ}")  # pragma: no cover


def _apply(cfg: JobConfig, section: str, key: str, value: Any, source: str) -> None:
    sections = _field_types(JobConfig)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sections)})")
    sec_obj = getattr(cfg, section)
    keys = _field_types(type(sec_obj))
    if key not in keys:
        raise ConfigError(f"{source}: unknown key '{section}.{key}' (known in [{section}]: {', '.join(keys)})")
    setattr(sec_obj, key, _coerce(value, keys[key], f"{source}: '{section}.{key}'"))


def load_toml(cfg: JobConfig, path: str | Path) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for section, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: top-level key '{section}' must be a [section] table")
        for key, value in body.items():
            _apply(cfg, section, key, value, str(path))
    cfg.job.config_file = str(path)
    return cfg


def parse_cli_overrides(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """`--a.b v`, `--a.b=v` and bare `--a.b` (a bool flag) -> [(section, key, raw or None)]."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.key [value], got {arg!r}")
        name, eq, raw = arg[2:].partition("=")
        section, _, key = name.partition(".")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw = argv[i + 1]
                i += 1
            else:
                raw = None
        out.append((section, key, raw))
        i += 1
    return out


def load_job_config(argv: list[str] | None = None) -> JobConfig:
    """Build the JobConfig from `--job.config_file F` (if given) and the other overrides in argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = parse_cli_overrides(argv)
    cfg = JobConfig()
    for section, key, raw in overrides:
        if (section, key) == ("job", "config_file"):
            if raw is None:
                raise ConfigError("command line: --job.config_file needs a path")
            load_toml(cfg, raw)
    for section, key, raw in overrides:
        if (section, key) == ("job", "config_file"):
            continue
        if raw is None:  # bare flag: only valid for bools
            sec_obj = getattr(cfg, section, None)
            if sec_obj is not None and _field_types(type(sec_obj)).get(key) is bool:
                raw = "true"
            else:
                raise ConfigError(f"command line: '--{section}.{key}' needs a value")
        _apply(cfg, section, key, raw, "command line")
    return resolve_placeholders(cfg)


def resolve_placeholders(cfg: JobConfig) -> JobConfig:
    """Replace "{dump_folder}" in every string field, so chained stages can name each other's outputs
    relative to one dump folder that a command-line override can move."""
    dump = cfg.job.dump_folder
    for sec in dataclasses.fields(cfg):
        sec_obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(sec_obj):
            v = getattr(sec_obj, f.name)
            if isinstance(v, str) and "{dump_folder}" in v:
                setattr(sec_obj, f.name, v.replace("{dump_folder}", dump))
            elif isinstance(v, list) and any(isinstance(x, str) and "{dump_folder}" in x for x in v):
                setattr(sec_obj, f.name, [x.replace("{dump_folder}", dump) if isinstance(x, str) else x for x in v])
    return cfg


def config_to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)
