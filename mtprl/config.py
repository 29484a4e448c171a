"""Flat dataclass configs: one per entry point, loaded from YAML and overridden from the command line.

A config is a plain `@dataclass` whose fields carry their help text in `field(metadata={"help": ...})`
(use the `opt` shorthand below). `add_config_arguments` turns the fields into `--field-name`
options plus `--config FILE`; `load_config` merges defaults < YAML < command line, checks every
key and type, and finally calls the dataclass's own `validate()` if it has one. All of this
happens before any model is built, so a bad config costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from mtprl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value, key or file is wrong; the message names it and how to fix it."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(a) for a in get_args(inner))
    elif get_origin(inner) in (list, tuple):
        text = f"a list of {_describe(get_args(inner)[0])}"
    else:
        text = getattr(inner, "__name__", str(inner))
    return text + (" or null" if optional else "")


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp` and convert what converts losslessly."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{name}' may not be null; give {_describe(tp)}")
    origin = get_origin(inner)
    bad = ConfigError(f"config field '{name}' must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in get_args(inner):
            raise ConfigError(
                f"config field '{name}' must be one of {', '.join(map(repr, get_args(inner)))}; got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        item_tp = get_args(inner)[0]
        items = [coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config FILE` and a `--field-name VALUE` option per field of `cls`."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with config values (command-line options win)")
    group = parser.add_argument_group(f"{cls.__name__} fields (YAML keys use underscores)")
    for name, (f, tp) in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} [default: {default!r}]".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        inner, _ = _unwrap_optional(tp)
        if inner is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(inner) in (list, tuple):
            group.add_argument(flag, dest=name, nargs="+", default=None, metavar="V", help=help_text)
        else:
            choices = list(get_args(inner)) if get_origin(inner) is Literal else None
            group.add_argument(flag, dest=name, default=None, choices=choices, metavar="V" if not choices else None,
                               help=help_text)


def _check_keys(cls: type, keys: typing.Iterable[str], source: str) -> None:
    known = set(_fields(cls))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key '{key}' in {source}{hint}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(cls: type, values: dict[str, Any], source: str = "the config"):
    """Instantiate `cls` from a dict, checking keys and types, then run its `validate()`."""
    _check_keys(cls, values, source)
    fields = _fields(cls)
    kwargs = {k: coerce(k, v, fields[k][1]) for k, v in values.items()}
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config(cls: type, args: argparse.Namespace | None = None, **overrides: Any):
    """defaults < YAML file (args.config) < command-line options < keyword overrides."""
    values: dict[str, Any] = {}
    source = "the config"
    if args is not None and getattr(args, "config", None):
        values.update(read_yaml(args.config))
        source = f"config file '{args.config}'"
        _check_keys(cls, values, source)
    if args is not None:
        for name in _fields(cls):
            v = getattr(args, name, None)
            if v is not None:
                values[name] = v
    values.update(overrides)
    return build_config(cls, values, source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds; used by configs' validate()."""
    if not condition:
        raise ConfigError(message)
