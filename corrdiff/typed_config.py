"""Settings -> a validated, typed config: the one way every job and model file builds one.

Each job's settings are a frozen dataclass (``CompressConfig``, ``TrainConfig``, ...). A YAML
file and the command line's flags are merged into plain data, which pydantic validates
against that dataclass in strict mode: an unknown key, a value of the wrong type (a string
where a number belongs, a float where an integer does) or a value the dataclass's own
``__post_init__`` refuses is a :class:`ConfigError` naming the key and where it came from,
before any work. Strict validation runs in pydantic's JSON mode, where a YAML list is
accepted for a tuple and an integer for a float, and nothing else is coerced.

Plain data and files only (no storage, no Ray), so ``corrdiff`` itself can read the model
config stored in a weights file with it (``ModelConfig.from_json``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """Settings that do not make the config: each problem with its key and its source."""


def load_config(cls: type[T], path: str | None, overrides: Mapping[str, Any] | None = None,
                extend: Mapping[str, Sequence[Any]] | None = None) -> T:
    """The config of type ``cls`` from the YAML file at ``path`` (None: no file), with the
    flags applied on top.

    ``overrides`` maps dotted keys (``codec.model``) to flag values; ``None`` means the flag
    was not given and leaves the file's value. ``extend`` maps dotted keys of list settings
    to values appended to the file's list (``--model-store`` adds to ``model_stores``).
    """
    data = read_yaml(path) if path else {}
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in flags.items():
        _set(data, key, value)
    for key, values in (extend or {}).items():
        if values:
            flags[key] = values
            _set(data, key, [*(_get(data, key) or ()), *values])
    if path is None:  # every setting came from a flag
        return parse_config(cls, data, "the command line")
    return parse_config(cls, data, path, flag_keys=tuple(flags))


def parse_config(cls: type[T], data: Mapping[str, Any], source: str, flag_keys: Sequence[str] = ()) -> T:
    """Validate plain ``data`` (parsed YAML or JSON) as ``cls``, strictly; ``source`` names
    the file in errors, and keys under ``flag_keys`` are blamed on the command line."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        text = json.dumps(data, default=str)
    except ValueError as error:  # e.g. a circular YAML alias
        raise ConfigError(f"{source}: {error}") from None
    try:
        return _adapter(cls).validate_json(text, strict=True, extra="forbid")
    except ValidationError as error:
        problems = [_problem(entry, source, flag_keys) for entry in error.errors()]
        raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML config file as a dict (an empty file is no settings)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top, got {type(data).__name__}")
    return data


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _problem(entry: Mapping[str, Any], source: str, flag_keys: Sequence[str]) -> str:
    """One validation error as ``source: key: what is wrong``."""
    key = ".".join(str(part) for part in entry["loc"])
    if any(key == k or key.startswith(k + ".") for k in flag_keys):
        blamed = "the command line"
    elif any(k.startswith(key + ".") for k in flag_keys) or (not key and flag_keys):  # a check over both
        blamed = f"{source} and the command line"
    else:
        blamed = source
    kind = entry["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        message = "unknown key"
    elif kind == "missing" or kind == "missing_argument":
        message = "required, and not given"
    else:
        message = str(entry["msg"]).removeprefix("Value error, ")
        if kind != "value_error" and "input" in entry and not isinstance(entry["input"], (dict, list)):
            message += f" (got {entry['input']!r})"
    return f"{blamed}: {key}: {message}" if key else f"{blamed}: {message}"  # a whole-config check names its keys


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        child = data.get(part)
        data[part] = child = dict(child) if isinstance(child, Mapping) else {}
        data = child
    data[last] = value
