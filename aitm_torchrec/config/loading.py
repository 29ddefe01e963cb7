"""Loading: a config file (YAML, or an EasyRec pipeline config) -> a validated ``Config``.

``load_config(path, overrides)`` is the entry point: it reads the file into a plain mapping
(``read_raw``: YAML as it is; EasyRec text converted by ``easyrec.to_raw``), applies the
``key.path=value`` overrides to it (``apply_override``: values parsed as YAML, ``a.b=[1,2]``,
``x.0.y=true``; list items by index), defaults ``model_dir`` to ``runs/<file stem>``, then builds
and validates it (``build_checked``). ``build`` is generic: it turns plain YAML data into any of
the dataclasses in ``types`` by their field annotations, rejecting unknown keys, missing required
keys and values of the wrong type. Every error is a ``ConfigError`` naming the file and key path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from aitm_torchrec.config.errors import ConfigError
from aitm_torchrec.config.types import Config, TableConstraint
from aitm_torchrec.config.validation import validate

# The repository's configs/ (this file is aitm_torchrec/config/loading.py).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "aitm_taobao.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Reads a YAML config (or an EasyRec pipeline config, converted by ``easyrec.to_raw``),
    applies ``key.path=value`` overrides to its keys, builds and validates it."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = read_raw(path)
    for item in overrides:
        apply_override(raw, item, str(path))
    raw.setdefault("model_dir", str(Path("runs") / path.stem))
    return build_checked(raw, str(path))


def read_raw(path: Path) -> dict:
    """The config file as a plain mapping of our keys: YAML as it is, EasyRec converted."""
    # Imported here, not at the top: easyrec imports this package (ConfigError, build_checked), so
    # a top-level import would make the two modules import each other.
    from aitm_torchrec import easyrec

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    if easyrec.is_easyrec(path, text):
        return easyrec.to_raw(path, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def build_checked(raw: dict, where: str) -> Config:
    """``build`` then ``validate``: the Config of a raw mapping, or a ConfigError naming ``where``."""
    cfg = build(Config, raw, f"{where}:")
    validate(cfg, where)
    return cfg


def apply_override(raw: dict, item: str, where: str) -> None:
    """Sets ``a.b.0.c=value`` in the raw mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} must look like key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), where, create=True)
    last = parts[-1]
    parsed = yaml.safe_load(value) if value.strip() else ""
    if isinstance(node, list):
        node[_index(node, last, key, where)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ConfigError(f"{where}: override {key}: {'.'.join(parts[:-1])} is not a mapping or list")


def _index(node: list, part: str, key: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: override {key}: {part!r} is not an index below {len(node)}")
    return int(part)


def _child(node: Any, part: str, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key, where)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise ConfigError(f"{where}: override {key}: parent is a {type(node).__name__}, not a mapping")


def build(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass ``cls`` from plain YAML data, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys {_keys(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where} unknown key {unknown[0]!r}; allowed keys: {_keys(cls)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key_where = f"{where}{'' if where.endswith(':') else '.'}{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], key_where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_where} is required")
    return cls(**kwargs)


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _convert(tp: Any, value: Any, where: str) -> Any:
    if tp == tuple[tuple[str, TableConstraint], ...]:
        # ShardingConfig.tables is a mapping in YAML: {feature_name: {sharding_types: [...]}}.
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must map feature names to constraints, got {value!r}")
        return tuple((str(k), build(TableConstraint, v, f"{where}.{k}")) for k, v in value.items())
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} is {value!r}; allowed: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            items = value if isinstance(value, list) else [value]  # EasyRec allows a scalar
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(items))
        raise TypeError(f"unsupported schema type {tp}")
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # YAML reads 1e-6 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported schema type {tp}")


def to_dict(cfg: Any) -> Any:
    """The config as plain data (for summaries and checkpoints)."""
    return dataclasses.asdict(cfg)
