"""Early config validation: bind each config section to the dataclass its component takes.

Like torchtune's config validation, every section is checked against the signature of the
thing that uses it *before anything is built*, and all problems are reported at once, one per
line, each naming the key to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
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
            errors.append(unknown_key(name, list(fields), key))
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
    errors.extend(full(msg) for msg in check_bounds(obj))
    check = getattr(obj, "check", None)
    if check is not None:
        errors.extend(full(msg) for msg in check())
    return obj


def unknown_key(name: str, known: list[str], section: str = "") -> str:
    """``<key>: unknown key; did you mean <closest>?`` (or the known keys when none is close)."""
    def full(n: str) -> str:
        return f"{section}.{n}" if section else n

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    where = f"{section} has" if section else "top-level keys are"
    return (f"{full(name)}: unknown key; did you mean {full(close[0])}?" if close
            else f"{full(name)}: unknown key; {where} {', '.join(sorted(known))}")


SEED_MAX = 2**32 - 1  # numpy's seed range


_UNSET = object()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Bounds:
    """Declarative range of a config field (``ge`` / ``gt`` / ``le`` / ``lt``) or its allowed ``choices``;
    ``each``: the bounds apply to every element of a list; ``msg``: the message after ``<key>: ``, with
    ``{value}`` and ``{range}`` (e.g. ``in [0, 1)``) filled in. ``None`` (a null setting) is never checked."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    each: bool = False
    msg: str | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"

    def holds(self, v: Any) -> bool:
        if self.choices is not None:
            return v in self.choices
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def message(self, value: Any) -> str:
        values = value if self.each else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"{value} is not a finite number; use a value {self.describe()}"
        return (self.msg or "{value} must be {range}").format(value=value, range=self.describe())


def setting(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: tuple | None = None, each: bool = False, msg: str | None = None, in_key: bool = True,
            key_neutral: Any = _UNSET) -> Any:
    """A required config field with declarative bounds, checked by :func:`bind` before the dataclass's own
    ``check()`` (cross-field rules stay there). ``in_key=False``: see :func:`not_in_key`; ``key_neutral``:
    see :func:`key_neutral`. The value itself lives in ``conf/`` only (no default here)."""
    meta: dict[str, Any] = {}
    if any(b is not None for b in (ge, gt, le, lt, choices)):
        meta["bounds"] = Bounds(ge, gt, le, lt, tuple(choices) if choices is not None else None, each, msg)
    if not in_key:
        meta["in_key"] = False
    if key_neutral is not _UNSET:
        meta["key_neutral"] = key_neutral
    return dataclasses.field(metadata=meta)


def check_bounds(obj: Any) -> list[str]:
    """One ``<field>: <message>`` per field of a bound config whose value breaks its declared bounds."""
    errors = []
    for f in dataclasses.fields(obj):
        bounds: Bounds | None = f.metadata.get("bounds")
        value = getattr(obj, f.name)
        if bounds is None or value is None:
            continue
        if not all(bounds.holds(v) for v in (value if bounds.each else [value])):
            errors.append(f"{f.name}: {bounds.message(value)}")
    return errors


def not_in_key(**bounds: Any) -> Any:
    """Mark a required config field that does not change an artifact (a gate, a node switch, a report
    knob): artifact keys leave it out, so changing it re-uses what was built."""
    return setting(in_key=False, **bounds)


def key_neutral(value: Any, **bounds: Any) -> Any:
    """Mark a required config field added after artifacts were built: at ``value`` (what the code did
    before it existed) artifact keys leave it out, so existing artifacts stay valid."""
    return setting(key_neutral=value, **bounds)


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
