"""Apply plain YAML data onto typed dataclass defaults, checking every key and value.

This is the generic half of the configuration system (the schema lives in ``config.py``):
``apply(obj, data, where)`` returns a copy of the dataclass instance ``obj`` with the nested
mapping ``data`` merged in. Mappings merge key by key into nested dataclasses; every other
value replaces the default. Unknown keys raise :class:`ConfigError` with a close-match
suggestion; a value of the wrong type raises naming the dotted key and the expected type.

Accepted conversions (nothing else is coerced): int -> float; a string that parses as a float
for a float field (YAML 1.1 reads ``5e-4`` as a string); a list -> tuple for tuple fields; a
single value -> one-element list for list fields; a mapping or a string -> a dataclass field
whose class defines ``from_yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["ConfigError", "apply", "coerce", "known_keys", "to_plain"]


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


def apply(obj: Any, data: Mapping[str, Any], where: str = "") -> Any:
    """Return a copy of dataclass instance ``obj`` with ``data`` merged in (see module doc)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_name(where)} must be a mapping of keys, got {_show(data)}")
    hints = get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(_unknown(path, str(key), sorted(fields)))
        current = getattr(obj, key)
        changes[key] = coerce(value, hints[key], path, current)
    return dataclasses.replace(obj, **changes)


def coerce(value: Any, hint: Any, path: str, current: Any = None) -> Any:
    """Check ``value`` against the type ``hint`` and return it in that type."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{_name(path)} may not be null; expected {_describe(hint)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, path, current)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{_name(path)} expects {_describe(hint)}, got {_show(value)}")
    if origin is Literal:
        allowed = get_args(hint)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{_name(path)} must be one of {', '.join(repr(a) for a in allowed)}; "
            f"got {_show(value)}{hint_text}"
        )
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        from_yaml = getattr(hint, "from_yaml", None)
        if isinstance(value, Mapping):
            base = current if isinstance(current, hint) else hint()
            return apply(base, value, path)
        if from_yaml is not None:
            return from_yaml(value, path)
        raise ConfigError(f"{_name(path)} expects a mapping of keys, got {_show(value)}")
    if origin is list:
        (item,) = get_args(hint)
        items = value if isinstance(value, list | tuple) else [value]
        return [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(items)]
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{_name(path)} expects {_describe(hint)}, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{_name(path)} expects {len(args)} values ({_describe(hint)}), got {_show(value)}"
            )
        return tuple(
            coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        key_type, value_type = get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_name(path)} expects a mapping, got {_show(value)}")
        return {
            coerce(k, key_type, f"{path}.{k}"): coerce(v, value_type, f"{path}.{k}")
            for k, v in value.items()
        }
    return _scalar(value, hint, path)


def _scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{_name(path)}: unsupported annotation {hint!r} in the config schema")
    raise ConfigError(f"{_name(path)} expects {_describe(hint)}, got {_show(value)}")


def to_plain(obj: Any) -> Any:
    """Dataclasses / tuples -> nested dicts and lists of YAML scalars (field order kept)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_yaml = getattr(obj, "to_yaml", None)
        if to_yaml is not None:
            return to_yaml()
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def known_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass instance (leaves and sections)."""
    keys = []
    for f in dataclasses.fields(obj):
        path = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(path)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not getattr(value, "from_yaml", None):
            keys.extend(known_keys(value, path))
    return keys


def _unknown(path: str, key: str, siblings: list[str]) -> str:
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if close:
        suggestion = f"{parent}.{close[0]}" if parent else close[0]
        return f"unknown config key {path!r} (did you mean {suggestion!r}?)"
    where = f"under {parent!r}" if parent else "at the top level"
    return f"unknown config key {path!r}; keys {where}: {', '.join(siblings)}"


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is list:
        return f"a list of {_describe(get_args(hint)[0])}"
    if origin is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _name(path: str) -> str:
    return f"config key {path!r}" if path else "the configuration"
