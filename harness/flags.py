"""Command-line flags of every harness, the method flags generated from the policies' own fields.

A hyper-parameter is declared once, as a field of its policy (``lacache_core/policies/``): the
field's name is the flag, its annotation the type (``Literal[...]`` gives the choices), its default
the method's default, its :func:`~lacache_core.policies.base.param` range the check, and the class
docstring's ``Parameters`` entry the help. A method registered in ``METHODS`` gets its flags, its
folder-name fragment and its place in ``run.json`` from here with no other edit.

Flags default to ``None`` ("the method's own default"), so one command line can run several
methods whose defaults differ; :func:`resolved_hyperparameters` fills the defaults in for the
result's identity.

Quantizers (``QUANTIZERS``, ``--quant``) and sparse readers (``READERS``, ``--read``) get theirs the same way:
a field's flag is its class's prefix plus its name (``--quant_bits``; ``param(flag_name=...)`` names its own,
``--quest_budget``), one flag serves every registered class that declares the field, and a value given without
an option that reads it is an error (:func:`option_setting`). The library names a setting ``Class.field``;
:func:`as_flags` says it in flags.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from dataclasses import MISSING, dataclass, fields
from typing import Dict, List, Optional, Tuple

from lacache_core.cache import KEY_ROTATIONS
from lacache_core.errors import ConfigError
from lacache_core.params import BOUNDS, Setting, base_type, choices_of, describe_range, left_out_of_identity, type_hints
from lacache_core.policies import METHODS, budget_derived
from lacache_core.quantizers import QUANTIZERS
from lacache_core.readers import READERS

#: Fields every budgeted method shares, set by the harness's budget flags rather than generated.
BUDGET_FIELDS = ("cache_size", "start_size")
GROUPS = ("model", "data", "method", "output")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` (one line naming the flag) instead of printing usage and
    exiting, so that :func:`harness.runner.cli` reports a bad flag like any other bad setting."""

    def error(self, message):
        raise ConfigError(message)


def parser(description: str) -> Tuple[ArgumentParser, Dict[str, argparse._ArgumentGroup]]:
    """A harness's parser and its flag groups (model, data, method, output), in that order in ``--help``."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, {name: p.add_argument_group(name) for name in GROUPS}


# ----------------------------------------------------------------------------------------- method flags
@dataclass(frozen=True)
class MethodFlag:
    """One generated flag: a hyper-parameter field, merged over the methods that declare it."""

    name: str
    kind: type
    choices: Optional[tuple]
    defaults: Dict[str, object]  #: method name -> its default
    doc: str
    valid: str

    def help(self, override=None) -> str:
        values = set(map(repr, self.defaults.values()))
        methods = "every method" if set(self.defaults) == set(METHODS) else ", ".join(self.defaults)
        if override is not None:
            default = f"default here {override!r}"
        elif len(values) == 1:
            default = f"default {next(iter(self.defaults.values()))!r}"
        else:
            default = "defaults " + ", ".join(f"{m} {d!r}" for m, d in self.defaults.items())
        valid = "" if self.choices or self.valid == "any value" else f"; {self.valid}"
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", self.doc).replace("``", "")
        return f"{doc} [{methods}; {default}{valid}]".replace("%", "%%")


def field_docs(cls) -> Dict[str, str]:
    """The ``name : type`` entries of the numpy-style ``Parameters`` sections of ``cls`` and its bases."""
    docs: Dict[str, str] = {}
    for klass in cls.__mro__:
        text = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        section = re.search(r"^Parameters\n-+\n(.*?)(?:\n\n\S|\n[A-Z][a-z]+\n-+\n|\Z)", text, re.S | re.M)
        if not section:
            continue
        entries = re.findall(r"^(\w+) :[^\n]*\n((?:[ \t]+[^\n]*\n?)+)", section.group(1) + "\n", re.M)
        for name, body in entries:
            docs.setdefault(name, " ".join(body.split()))
    return docs


def method_flags() -> Dict[str, MethodFlag]:
    """Every hyper-parameter of every registered method, by flag name (read at call time, so that a
    method registered at run time has its flags too)."""
    merged: Dict[str, dict] = {}
    for method, cls in METHODS.items():
        hints, docs = type_hints(cls), field_docs(cls)
        for f in fields(cls):
            if not f.init or not f.metadata.get("flag", True) or f.name in BUDGET_FIELDS:
                continue
            annotation = hints[f.name]
            entry = merged.setdefault(f.name, {"kind": base_type(annotation), "choices": choices_of(annotation),
                                               "defaults": {}, "doc": docs.get(f.name, ""), "meta": f.metadata})
            if entry["kind"] is not base_type(annotation):
                raise TypeError(f"{cls.__name__}.{f.name} is {annotation}, another method declares it "
                                f"{entry['kind'].__name__}: one flag cannot take both")
            entry["defaults"][method] = None if f.default is MISSING else f.default
            entry["doc"] = entry["doc"] or docs.get(f.name, "")
    out = {}
    for name, e in merged.items():
        fixed = {k: v for k, v in e["meta"].items() if k in BOUNDS and v is not None and not callable(v)}
        valid = describe_range(**fixed)  # bounds that depend on other fields are checked with their values
        out[name] = MethodFlag(name, e["kind"], e["choices"], e["defaults"], e["doc"], valid)
    return out


def _add_flag(group, flag: MethodFlag, override=None) -> None:
    if flag.kind is bool:
        # --X / --no_X (the official LaCache script spells --no_compensate with an underscore)
        group.add_argument(f"--{flag.name}", dest=flag.name, action="store_const", const=True, default=None,
                           help=flag.help(override))
        group.add_argument(f"--no_{flag.name}", dest=flag.name, action="store_const", const=False,
                           help=f"turn --{flag.name} off")
        return
    group.add_argument(f"--{flag.name}", type=flag.kind, choices=flag.choices, default=None,
                       help=flag.help(override))


def add_method_flags(group, *, default_method: Optional[str] = "lacache", defaults: Optional[dict] = None,
                     budget: Optional[float] = None, cache_size: Optional[int] = None,
                     start_help: str = "leading tokens kept by every method (default: the official LongBench rule "
                                       "min(128, T - (L+1), C - (L+1)))",
                     start_size: Optional[int] = None, prefill_chunks: bool = True) -> None:
    """``--method``, the budget, every method's hyper-parameters and the cache settings.

    ``budget`` (a fraction of the length the harness names) is offered when not ``None`` and is the
    default unless ``--cache_size`` (tokens) is given; ``defaults`` overrides a method flag's default
    for this harness (``{"span": 14}`` in ``niah/``).
    """
    group.add_argument("--method", default=default_method, help=f"comma list of {sorted(METHODS)} (run in turn)")
    if budget is not None:
        group.add_argument("--budget", type=float, default=None,
                           help=f"cache size as a fraction of the length the harness names (default {budget:g}; "
                                "not with --cache_size)")
    group.add_argument("--cache_size", type=int, default=None if budget is not None else cache_size,
                       help="cache size in tokens per layer" + (" (instead of --budget)" if budget is not None
                                                                else f" (default {cache_size})"))
    group.add_argument("--start_size", type=int, default=start_size, help=start_help)
    defaults = defaults or {}
    for flag in method_flags().values():
        _add_flag(group, flag, defaults.get(flag.name))
    group.add_argument("--key_rotation", choices=KEY_ROTATIONS, default="auto",
                       help="every_step: keys stored un-rotated, all rotated at each step (official); incremental: "
                            "stored rotated, re-rotated by their shift at each compaction; auto: incremental where "
                            "exact or float32-accurate (see CompressedCache)")
    for option in OPTIONS:
        _add_option_flags(group, option)
    if prefill_chunks:
        group.add_argument("--prefill_chunk_size", type=int, default=None,
                           help="feed the prompt N tokens at a time and compact between chunks (bounded memory); "
                                "default: the whole prompt, as the official harnesses")
    group.set_defaults(_budget_default=budget, _flag_defaults=defaults, _start_default=start_size, **defaults)


def check_method_flags(args) -> None:
    """One-line errors for the budget flags (the hyper-parameters are checked by their policies)."""
    args.methods = parse_methods(args.method)
    harness_defaults = getattr(args, "_flag_defaults", None) or {}
    for name, flag in method_flags().items():
        value = getattr(args, name, None)
        if value is None or harness_defaults.get(name) == value:
            continue
        if not any(m in flag.defaults for m in args.methods):  # e.g. one flag set for several runs of a script
            print(f"note: --{name} is ignored: {', '.join(args.methods)} does not take it "
                  f"({', '.join(flag.defaults)} does)", file=sys.stderr)
    if getattr(args, "quant", "none") != "none":
        for method in args.methods:
            for name, reason in METHODS[method].quant_ignores.items():
                if getattr(args, name, None) is not None:
                    print(f"note: --{name} is ignored with --quant: {as_flags(reason)}", file=sys.stderr)
    for method in args.methods:  # each method's own ranges, before any model is loaded
        check_hyperparameters(method, method_settings(args, method), args.start_size)
    default_budget = getattr(args, "_budget_default", None)
    if default_budget is not None:
        if args.budget is not None and args.cache_size is not None:
            raise ConfigError("give --budget (a fraction) or --cache_size (tokens), not both")
        if args.budget is None and args.cache_size is None:
            args.budget = default_budget
        if args.budget is not None and not 0 < args.budget <= 1:
            raise ConfigError(f"--budget must be in (0, 1], got {args.budget}")
    if args.cache_size is not None and args.cache_size < 1:
        raise ConfigError(f"--cache_size must be >= 1, got {args.cache_size}")
    if args.start_size is not None and args.start_size < 0:
        raise ConfigError(f"--start_size must be >= 0, got {args.start_size}")
    if getattr(args, "prefill_chunk_size", None) is not None and args.prefill_chunk_size < 1:
        raise ConfigError(f"--prefill_chunk_size must be >= 1, got {args.prefill_chunk_size}")


def check_hyperparameters(method: str, given: dict, start_size: Optional[int]) -> None:
    """Build ``method`` with the given hyper-parameters and a budget that fits any of them, so that a value
    out of its own range is one error line before the model loads (budget-dependent bounds are checked
    when the harness builds the real cache)."""
    cls = METHODS[method]
    names = {f.name for f in fields(cls) if f.init}
    settings = {k: v for k, v in given.items() if k in names}
    if start_size is not None and "start_size" in names and start_size >= 0:
        settings["start_size"] = start_size
    if "cache_size" in names:
        settings["cache_size"] = 1 << 30
    cls(**settings)


def int_list(args, flag: str, low: int, what: str) -> List[int]:
    """``--flag a,b,c`` as integers ``>= low`` (``what`` says what they are), or a one-line error."""
    text = getattr(args, flag)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise ConfigError(f"--{flag} must be a comma list of {what} (integers >= {low}), got {text!r}")
    return values


def at_least_one(args, *flags: str) -> None:
    """One-line error unless every integer flag named is ``>= 1``."""
    for flag in flags:
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")


def parse_methods(text: str, flag: str = "--method") -> List[str]:
    methods = [m.strip() for m in (text or "").split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ConfigError(f"{flag} must be a comma list of {sorted(METHODS)}, got {text!r}")
    return methods


def method_settings(args, method: str) -> dict:
    """The hyper-parameters given on the command line that ``method`` takes (for ``build_policy``),
    and the cache's ``key_rotation``; the budget fields are the harness's to add."""
    names = [n for n in METHODS[method].hyperparameters() if n not in BUDGET_FIELDS]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return {**given, "key_rotation": args.key_rotation, "quant": quant_setting(args), "read": read_setting(args)}


# ---------------------------------------------------------------------------- quantizer and reader flags
@dataclass(frozen=True)
class Option:
    """A choice that composes with every method: its registry (name -> :class:`lacache_core.params.Setting`
    subclass) and the opening of its ``--help``."""

    registry: Dict[str, type]
    intro: str


#: ``--quant`` and ``--read``, each with its registry (read at call time: a class registered at run time is in).
OPTIONS: Dict[str, Option] = {
    "quant": Option(QUANTIZERS, "KV quantization next to any --method; eviction runs on the codes"),
    "read": Option(READERS, "sparse reads next to any --method"),
}


@dataclass(frozen=True)
class OptionFlag:
    """One generated flag of a quantizer's or reader's field, merged over the registered classes that declare it."""

    name: str
    option: str
    kind: type
    choices: Optional[tuple]
    defaults: Dict[str, object]  #: registered name -> its default
    doc: str
    valid: str

    @property
    def default(self):
        """The flag's default: the one default its classes share, else ``None`` (each class's own)."""
        values = list(self.defaults.values())
        return values[0] if all(v == values[0] for v in values) else None

    def help(self) -> str:
        shared = self.default is not None or not self.defaults
        default = f"default {self.default!r}" if shared else "defaults " + ", ".join(
            f"{m} {d!r}" for m, d in self.defaults.items())
        valid = "" if self.choices or self.valid == "any value" else f"; {self.valid}"
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", self.doc).replace("``", "")
        return f"{doc} [--{self.option} {', '.join(self.defaults)}; {default}{valid}]".replace("%", "%%")


def option_flags(option: str) -> Dict[str, OptionFlag]:
    """Every field of every class registered for ``--<option>``, by flag name."""
    merged: Dict[str, dict] = {}
    for name, cls in OPTIONS[option].registry.items():
        hints, docs = type_hints(cls), field_docs(cls)
        for f in fields(cls):
            if not f.init or not f.metadata.get("flag", True):
                continue
            entry = merged.setdefault(cls.flag_of(f), {"kind": base_type(hints[f.name]), "defaults": {}, "meta": f.metadata,
                                                       "choices": choices_of(hints[f.name]), "doc": docs.get(f.name, "")})
            if entry["kind"] is not base_type(hints[f.name]):
                raise TypeError(f"{cls.__name__}.{f.name} is {hints[f.name]}, another --{option} declares it "
                                f"{entry['kind'].__name__}: one flag cannot take both")
            entry["defaults"][name] = None if f.default is MISSING else f.default
    out = {}
    for flag, e in merged.items():
        fixed = {k: v for k, v in e["meta"].items() if k in BOUNDS and v is not None and not callable(v)}
        out[flag] = OptionFlag(flag, option, e["kind"], e["choices"], e["defaults"], e["doc"], describe_range(**fixed))
    return out


def _add_option_flags(group, option: str) -> None:
    """``--<option>`` (``none`` or a registered name) and every registered class's field flags."""
    registry = OPTIONS[option].registry
    summaries = "; ".join(f"{name} ({_summary(cls)})" for name, cls in registry.items())
    group.add_argument(f"--{option}", choices=("none", *registry), default="none",
                       help=f"{OPTIONS[option].intro}: {summaries} (default none)".replace("%", "%%"))
    for flag in option_flags(option).values():
        if flag.kind is bool:
            group.add_argument(f"--{flag.name}", dest=flag.name, action="store_const", const=True, default=flag.default,
                               help=flag.help())
            group.add_argument(f"--no_{flag.name}", dest=flag.name, action="store_const", const=False,
                               help=f"turn --{flag.name} off")
        else:
            group.add_argument(f"--{flag.name}", type=flag.kind, choices=flag.choices, default=flag.default,
                               help=flag.help())


def _summary(cls) -> str:
    """The first paragraph of ``cls``'s docstring, on one line."""
    text = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", " ".join(text.split())).replace("``", "").rstrip(".")


def _unused_flags(args, option: str) -> None:
    """One-line error for a flag given a value other than its default where ``--<option>`` does not read it (no
    class registered under that name declares the field), so a run is never silently other than the one asked for."""
    chosen = getattr(args, option, "none")
    for name, flag in option_flags(option).items():
        value = getattr(args, name, flag.default)
        if value is not None and value != flag.default and chosen not in flag.defaults:
            raise ConfigError(f"--{name} {value} needs --{option} {' or '.join(flag.defaults)}; "
                              f"--{option} {chosen} does not use it")


def option_setting(args, option: str) -> Optional[Setting]:
    """The ``--<option>`` flags as the registered class's instance, or ``None`` for ``none`` (one-line errors for
    bad values; a flag not given, or at ``None``, leaves the class's default)."""
    _unused_flags(args, option)
    chosen, registry = getattr(args, option, "none"), OPTIONS[option].registry
    if chosen == "none":
        return None
    if chosen not in registry:
        raise ConfigError(f"--{option} must be one of {['none', *registry]}, got {chosen!r}")
    cls = registry[chosen]
    given = {f.name: getattr(args, cls.flag_of(f), None) for f in fields(cls) if f.init}
    return cls(**{k: v for k, v in given.items() if v is not None})


def option_identity(args, option: str) -> Optional[dict]:
    """``{"method": name, **fields}`` of :func:`option_setting` (fields added later left out at their defaults, so
    old hashes hold), or ``None``."""
    setting = option_setting(args, option)
    return None if setting is None else {"method": getattr(args, option), **setting.identity()}


def quant_setting(args):
    """The ``--quant`` flags as a :class:`lacache_core.quantizers.Quantizer`, or ``None``."""
    return option_setting(args, "quant")


def quant_identity(args) -> Optional[dict]:
    return option_identity(args, "quant")


def read_setting(args):
    """The ``--read`` flags as a :class:`lacache_core.readers.Reader`, or ``None``."""
    return option_setting(args, "read")


def read_identity(args) -> Optional[dict]:
    return option_identity(args, "read")


#: Library settings that are no class's field (arguments of ``make_cache``, ``build_policy``, ``prefill`` and the
#: model's ``from_pretrained``), and the flags that set them.
LIBRARY_FLAGS = {
    "make_cache.method": "--method", "make_cache.quant": "--quant", "make_cache.read": "--read",
    "make_cache.key_rotation": "--key_rotation", "make_cache.query_at_slot True": "--query_position slot",
    "build_policy.cache_size": "--cache_size", "prefill.chunk_size": "--prefill_chunk_size",
    "from_pretrained.attn_implementation": "--attn_implementation",
}


def setting_flags() -> Dict[str, str]:
    """Every setting's library name (``KIVI.bits``, ``make_cache.method``; a method's ``Class.field``) -> its flag
    (``--quant_bits``, ``--method``; the field's name), from the three registries at call time."""
    out = dict(LIBRARY_FLAGS)
    for cls in METHODS.values():
        out.update({f"{cls.__name__}.{f.name}": f"--{f.name}" for f in fields(cls) if f.init})
    for option in OPTIONS.values():
        for cls in option.registry.values():
            out.update({f"{cls.__name__}.{f.name}": f"--{cls.flag_of(f)}" for f in fields(cls) if f.init})
    return out


def as_flags(message: str) -> str:
    """A library error's ``message`` with each setting's name (:func:`setting_flags`) said as its flag: the one
    place where the library's language becomes the command line's."""
    names = setting_flags()
    pattern = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![\w.])(?:{pattern})(?![\w])", lambda m: names[m.group(0)], message)


def file_sha256(path) -> str:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None


def resolved_hyperparameters(args, method: str) -> dict:
    """Every hyper-parameter of ``method`` (budget fields aside): the given value, else the method's default
    (a field derived from the budget when not given is recorded as such)."""
    cls, out = METHODS[method], {}
    for f in fields(cls):
        if f.init and f.metadata.get("flag", True) and f.name not in BUDGET_FIELDS:
            value = getattr(args, f.name, None)
            if value is None:
                value = "from the budget" if f.name in budget_derived(cls) else (
                    None if f.default is MISSING else f.default)
            if f.metadata.get("file") and value is not None:  # a file's contents are part of the setting
                value = {"path": str(value), "sha256": file_sha256(value)}
            if not left_out_of_identity(f, value):
                out[f.name] = value
    return out


def hyperparameters(args, method: str) -> dict:
    """:func:`resolved_hyperparameters`, empty for the full cache (for the top level of ``run.json``)."""
    return {} if method == "full" else resolved_hyperparameters(args, method)


def method_identity(args, method: str) -> dict:
    """The method part of a prompt harness's setting: name, budget, sinks, every hyper-parameter, cache settings."""
    chunk = getattr(args, "prefill_chunk_size", None)
    quant = {"quant": quant_identity(args)} if quant_setting(args) is not None else {}  # none keeps old hashes
    if read_setting(args) is not None:
        quant["read"] = read_identity(args)
    if method == "full":
        return {"name": "full", "prefill_chunk_size": chunk, **quant}
    budget = {"budget": args.budget} if getattr(args, "budget", None) is not None else {"cache_size": args.cache_size}
    return {"name": method, **budget, "start_size": args.start_size, **resolved_hyperparameters(args, method),
            "key_rotation": args.key_rotation, "prefill_chunk_size": chunk, **quant}


def budget_label(args) -> str:
    return f"b{args.budget:g}" if getattr(args, "budget", None) is not None else f"c{args.cache_size}"


def method_tag(args, method: str) -> str:
    """Readable folder-name fragment: the method, its budget, its headline fields (``short``) and every
    hyper-parameter that differs from the method's default. The folder's hash covers the rest."""
    if method == "full":
        tag = "full"
    else:
        names = {f.name for f in fields(METHODS[method])}
        uses_budget = "cache_size" in names or budget_derived(METHODS[method])  # MiniCache keeps every token
        tag = f"{method}_{budget_label(args)}" if uses_budget else method
        for f in fields(METHODS[method]):
            if not f.init or not f.metadata.get("flag", True) or f.name in BUDGET_FIELDS:
                continue
            value = getattr(args, f.name, None)
            if f.metadata.get("short"):
                tag += f"_{f.metadata['short']}{f.default if value is None else value:g}"
            elif value is not None and value != f.default:
                tag += f"_{f.name}-{_label(value)}"
        if "start_size" in names and args.start_size is not None and args.start_size != getattr(args, "_start_default", None):
            tag += f"_s{args.start_size}"
        if args.key_rotation != "auto":
            tag += f"_r{args.key_rotation}"
    for setting in (quant_setting(args), read_setting(args)):  # each quantizer's and reader's own label
        if setting is not None:
            tag += f"_{setting.label()}"
    if getattr(args, "prefill_chunk_size", None):
        tag += f"_chunk{args.prefill_chunk_size}"
    return tag + ("" if args.dtype == "float32" else f"_{args.dtype}")


def _label(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def flags_table() -> str:
    """Markdown table of every method flag (the copy in docs/methods.md is checked against it by the tests)."""
    lines = ["| flag | methods | type | default | valid | meaning |", "|---|---|---|---|---|---|"]
    for flag in method_flags().values():
        kind = " / ".join(flag.choices) if flag.choices else flag.kind.__name__
        values = {repr(d) for d in flag.defaults.values()}
        default = next(iter(flag.defaults.values())) if len(values) == 1 else "by method"
        methods = "every method" if set(flag.defaults) == set(METHODS) else ", ".join(flag.defaults)
        name = f"`--{flag.name}` / `--no_{flag.name}`" if flag.kind is bool else f"`--{flag.name}`"
        valid = "" if flag.choices or flag.valid == "any value" else flag.valid
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", flag.doc).replace("``", "`").replace("|", "\\|")
        lines.append(f"| {name} | {methods} | {kind} | {default} | {valid} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flags_table())
