"""Early config validation: bind each config section to the dataclass its component takes.

Like torchtune's config validation, every section is checked against the signature of the
thing that uses it *before anything is built*, and all problems are reported at once, one per
line, each naming the key to fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.errors import PipelineError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise TypeError
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            raise TypeError
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, (dict, DictConfig)):
            raise TypeError
        return OmegaConf.to_container(value) if isinstance(value, DictConfig) else dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def bind(section: Any, cls: type[T], key: str, errors: list[str]) -> T | None:
    """Build ``cls`` from a config section; append one message per problem to ``errors``."""
    if section is None:
        errors.append(f"{key}: missing section; restore conf/ or pass +{key}=...")
        return None
    def full(name: str) -> str:
        return f"{key}.{name}" if key else name

    missing = {n for n in section if OmegaConf.is_missing(section, n)} if isinstance(section, DictConfig) else set()
    data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    n_before = len(errors)
    for name in data:
        if name not in fields:
            errors.append(f"{full(name)}: unknown key; known keys are {', '.join(sorted(fields))}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name in missing or (name not in data and required):
            errors.append(f"{full(name)}: missing; set {full(name)}=<{_type_name(hints[name])}>")
            continue
        if name not in data:
            continue
        try:
            kwargs[name] = _coerce(data[name], hints[name])
        except TypeError:
            errors.append(f"{full(name)}: got {data[name]!r}, expected {_type_name(hints[name])}; "
                          f"fix it with {full(name)}=<value>")
    if len(errors) > n_before:
        return None
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        errors.extend(full(msg) for msg in check())
    return obj


def not_in_key() -> Any:
    """Mark a required config field that does not change an artifact (a gate, a node switch, a report
    knob): artifact keys leave it out, so changing it re-uses what was built."""
    return dataclasses.field(metadata={"in_key": False})


def key_neutral(value: Any) -> Any:
    """Mark a required config field added after artifacts were built: at ``value`` (what the code did
    before it existed) artifact keys leave it out, so existing artifacts stay valid."""
    return dataclasses.field(metadata={"key_neutral": value})


def key_settings(obj: Any) -> dict[str, Any]:
    """The fields of a bound config that change the artifact (all but those marked ``not_in_key``, and
    those at their ``key_neutral`` value)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("in_key", True) and not ("key_neutral" in f.metadata and value == f.metadata["key_neutral"]):
            out[f.name] = value
    return out


def raise_if_errors(errors: list[str]) -> None:
    """Raise one ``PipelineError`` listing every problem (one line each)."""
    if errors:
        if len(errors) == 1:
            raise PipelineError(f"config error: {errors[0]}")
        raise PipelineError("config errors:\n  " + "\n  ".join(errors))
