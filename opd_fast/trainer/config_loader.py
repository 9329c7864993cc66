"""Reading a :class:`TrainConfig` from YAML and ``section.key=value`` overrides (``opd-fast train``'s ``--config`` and
arguments): each value checked against its field's type, unknown keys refused with the valid ones named.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from opd_fast.trainer.config import ConfigError, TrainConfig

# Numbers in exponent notation without a dot (1e-4, -3E5), which YAML 1.1 leaves as strings.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: object, annotation, example: object = 1) -> object:
    """Check a YAML value against a dataclass field's type (ints are accepted where floats are); ``example``
    (the field's current value, when of the right type) illustrates a valid value in the message."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        # str | list[str]: a list takes the list arm, anything else the first.
        hint = next((a for a in arms if typing.get_origin(a) is list), arms[0]) if isinstance(value, list) else arms[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, args[0]) for v in value):
            raise ConfigError(
                f"{key} must be a list of {args[0].__name__}; got {value!r} (write it as [a, b] in YAML, or "
                f"{key}=[a,b] as an override)"
            )
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 as text: only 1.0e-4 is a float there
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (e.g. 0.5, 1e-4, .inf); got {value!r}")
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if hint in (int, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        what = f"an integer (e.g. {example})" if hint is int else "a string (quote it in YAML)"
        raise ConfigError(f"{key} must be {what}; got {value!r}")
    return value


def _apply(target, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key} must be a mapping of its keys ({', '.join(f.name for f in dataclasses.fields(current))})"
                )
            _apply(current, value, f"{key}.")
        else:
            example = current if isinstance(current, int) and not isinstance(current, bool) else 1
            setattr(target, name, _coerce(key, value, hints[name], example))


def _is_text_field(config: TrainConfig, parts: list[str]) -> bool:
    """Whether ``parts`` names a str (or str | None) field: its override value is taken verbatim."""
    target = config
    for part in parts[:-1]:
        target = getattr(target, part, None)
        if not dataclasses.is_dataclass(target):
            return False
    hint = typing.get_type_hints(type(target)).get(parts[-1]) if dataclasses.is_dataclass(target) else None
    if hint is str:
        return True
    # str | None is text; str | list[str] | None (teacher.server) is YAML, so that [a, b] is a list.
    arms = set(typing.get_args(hint)) - {type(None)}
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and arms == {str}


def parse_override(text: str, config: TrainConfig | None = None) -> tuple[list[str], object]:
    """``"optim.lr=3e-4"`` → (["optim", "lr"], 3e-4). Values are parsed as YAML (numbers, bools, null,
    lists), except for text fields of ``config``, which take the text verbatim (e.g. templates with braces)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    if config is not None and _is_text_field(config, parts) and raw.strip() not in ("null", "~", ""):
        return parts, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {text!r}: cannot parse the value as YAML ({_yaml_problem(exc)}); quote text values"
        ) from None
    return parts, value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint on one line, with its position (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _apply_overrides(config: TrainConfig, overrides) -> None:
    for text in overrides:
        parts, value = parse_override(text, config)
        nested: object = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(config, nested)


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), *, base: list[str] = (), **top_level
) -> TrainConfig:
    """Defaults ← ``base`` overrides ← YAML file ← ``section.key=value`` overrides ← keyword arguments; validated."""
    config = TrainConfig()
    _apply_overrides(config, base)
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass a YAML file such as {path / 'run.yaml'}")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; check the path passed to --config")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
        _apply(config, data)
    _apply_overrides(config, overrides)
    _apply(config, {k: v for k, v in top_level.items() if v is not None})
    return config.validate()
