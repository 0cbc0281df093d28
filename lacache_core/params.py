"""Hyper-parameter fields: declared once, with their valid range, and checked by the class that holds them.

Methods (:mod:`lacache_core.policies`), quantizers (:mod:`lacache_core.quantizers`) and sparse readers
(:mod:`lacache_core.readers`) are dataclasses whose hyper-parameters are :func:`param` fields. The library
checks a value against its field's range and names it as a *setting*, ``Class.field`` (``KIVI.bits``,
``LaCache.overlap``); the harness generates its flags from the same fields and turns a setting's name into
its flag where it prints an error.
"""
from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Dict, Literal, Optional, Tuple, Union

from .errors import ConfigError

BOUNDS = ("low", "high", "above", "below")
Bound = Union[int, float, Callable[[object], Union[int, float]], None]


def param(default, *, low: Bound = None, high: Bound = None, above: Bound = None, below: Bound = None,
          flag: bool = True, short: Optional[str] = None, file: bool = False, added_later: bool = False,
          flag_name: Optional[str] = None):
    """A hyper-parameter field with its valid range: the one place that range is declared.

    ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive ones; a bound may be a
    function of the object (``high=lambda p: p.span - 1``). :func:`check_fields` enforces them, and
    the harness's flags are generated from the same fields (their help is the class docstring's
    ``Parameters`` entry). ``flag=False`` keeps a field off the command line; ``short`` is its label in
    result-folder names (``S16``), which then always show it. ``file=True``: the value is a file's path,
    and a run's identity records the file's contents' digest with it. ``added_later=True``: a field
    added after results were recorded; a run's identity leaves it out while it holds its default (which
    reproduces the earlier behaviour), so those results keep their hash. ``flag_name``: a quantizer's or
    reader's flag when it is not its registry's prefix plus the field's name (``Quest.token_budget`` is
    ``--quest_budget``).
    """
    return field(default=default, metadata={"low": low, "high": high, "above": above, "below": below, "flag": flag,
                                            "short": short, "file": file, "added_later": added_later,
                                            "flag_name": flag_name})


def left_out_of_identity(f, value) -> bool:
    """Whether a run's identity omits field ``f`` holding ``value`` (see ``param(added_later=True)``)."""
    return f.metadata.get("added_later", False) and value == f.default


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> Dict[str, object]:
    return typing.get_type_hints(cls)


def choices_of(annotation) -> Optional[Tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation, else ``None``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is Union:
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def base_type(annotation):
    """``int``, ``float``, ``bool`` or ``str`` behind ``Optional[...]`` / ``Literal[...]``."""
    choices = choices_of(annotation)
    if choices is not None:
        return type(choices[0])
    if typing.get_origin(annotation) is Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _check_value(name: str, annotation, value, meta: dict, owner) -> None:
    """One-line :class:`ConfigError` naming setting ``name`` (``Class.field``) where ``value`` is out of range."""
    if value is None and typing.get_origin(annotation) is Union and type(None) in typing.get_args(annotation):
        return
    choices = choices_of(annotation)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
        return
    kind = base_type(annotation)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a ' + kind.__name__}, got {value!r}")
    bound = {k: (b(owner) if callable(b) else b) for k, b in meta.items()}
    low, high, above, below = bound.get("low"), bound.get("high"), bound.get("above"), bound.get("below")
    if ((low is not None and value < low) or (high is not None and value > high)
            or (above is not None and value <= above) or (below is not None and value >= below)):
        raise ConfigError(f"{name} must be {describe_range(low, high, above, below)}, got {value!r}")


def describe_range(low=None, high=None, above=None, below=None) -> str:
    """``">= 1"``, ``"in [0, 15]"``, ``"in (0, 1]"``... (for errors and ``--help``)."""
    lower = f"[{low}" if low is not None else (f"({above}" if above is not None else None)
    upper = f"{high}]" if high is not None else (f"{below})" if below is not None else None)
    if lower and upper:
        return f"in {lower}, {upper}"
    if lower:
        return f">= {low}" if low is not None else f"> {above}"
    return f"<= {high}" if high is not None else (f"< {below}" if below is not None else "any value")


def check_fields(owner) -> None:
    """Raise a one-line :class:`ConfigError` for a field of ``owner`` of the wrong type or out of its
    :func:`param` range, naming it ``Class.field`` (fixed bounds first, then bounds that depend on other fields)."""
    hints, cls = type_hints(type(owner)), type(owner).__name__
    hyper = [f for f in fields(owner) if f.init]
    for f in hyper:
        fixed = {k: v for k, v in f.metadata.items() if not callable(v) and k in BOUNDS}
        _check_value(f"{cls}.{f.name}", hints[f.name], getattr(owner, f.name), fixed, owner)
    for f in hyper:
        if any(callable(v) for v in f.metadata.values()):
            bounds = {k: v for k, v in f.metadata.items() if k in BOUNDS}
            _check_value(f"{cls}.{f.name}", hints[f.name], getattr(owner, f.name), bounds, owner)


@dataclass(frozen=True)
class Setting:
    """A frozen dataclass of :func:`param` fields that composes with any method (a quantizer, a sparse reader),
    registered by :attr:`name`. Its fields are range-checked on construction, then :meth:`check` runs the
    rules that tie several fields together."""

    #: Its name in its registry (``--quant kivi``, ``--read quest``).
    name: ClassVar[str] = "setting"
    #: Its fields' flags are this plus the field's name (``None``: ``<name>_``), a ``param(flag_name=...)`` aside.
    flag_prefix: ClassVar[Optional[str]] = None

    def __post_init__(self):
        check_fields(self)
        self.check()

    @classmethod
    def flag_of(cls, f) -> str:
        """Field ``f``'s flag name (without ``--``): its ``flag_name``, else the prefix and its name."""
        prefix = f"{cls.name}_" if cls.flag_prefix is None else cls.flag_prefix
        return f.metadata.get("flag_name") or prefix + f.name

    def check(self) -> None:
        """Rules across fields: one-line :class:`ConfigError` naming the settings (``KIVI.residual``)."""

    @property
    def method(self) -> str:
        """Its registry name (``"kivi"``)."""
        return self.name

    def identity(self) -> dict:
        """The fields that decide results: every field, less those added later while at their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.init and not left_out_of_identity(f, getattr(self, f.name))}

    def label(self) -> str:
        """Readable folder-name fragment: the name, each ``short`` field as ``{short}{value}``, and each other
        field that differs from its default as ``{field}-{value}``."""
        parts = [self.name]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.init and f.metadata.get("short") is not None:
                parts.append(f"{f.metadata['short']}{_text(value)}")
            elif f.init and value != f.default:
                parts.append(f"{f.name}-{_text(value)}")
        return "_".join(parts)


def _text(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)
