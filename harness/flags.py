"""Command-line flags of every harness, the method flags generated from the policies' own fields.

A hyper-parameter is declared once, as a field of its policy (``lacache_core/policies/``): the
field's name is the flag, its annotation the type (``Literal[...]`` gives the choices), its default
the method's default, its :func:`~lacache_core.policies.base.param` range the check, and the class
docstring's ``Parameters`` entry the help. A method registered in ``METHODS`` gets its flags, its
folder-name fragment and its place in ``run.json`` from here with no other edit.

Flags default to ``None`` ("the method's own default"), so one command line can run several
methods whose defaults differ; :func:`resolved_hyperparameters` fills the defaults in for the
result's identity.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Dict, List, Optional, Tuple

from lacache_core.cache import KEY_ROTATIONS
from lacache_core.errors import ConfigError
from lacache_core.gear import GEAR
from lacache_core.policies import METHODS, budget_derived
from lacache_core.policies.base import BOUNDS, base_type, choices_of, describe_range, left_out_of_identity, type_hints
from lacache_core.quant import KIVI, QUANT_METHODS, quant_config
from lacache_core.quest import QUEST_RULES, READ_METHODS, Quest, read_config

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
    group.add_argument("--quant", choices=QUANT_METHODS, default="none",
                       help="KV quantization next to any --method: kivi (KIVI, Liu et al. 2024: keys per channel "
                            "before RoPE, values per token, asymmetric, grouped; newest tokens in full precision); "
                            "gear (GEAR-L, Kang et al. 2024: KIVI plus a rank --quant_rank approximation of each "
                            "block's quantization error); eviction runs on the codes (default none)")
    quant = KIVI()
    group.add_argument("--quant_bits", type=int, default=quant.bits,
                       help=f"--quant kivi, gear: 2, 4 or 8 (default {quant.bits})")
    group.add_argument("--quant_group", type=int, default=quant.group,
                       help=f"--quant kivi, gear: tokens per key block, channels per value group "
                            f"(default {quant.group})")
    group.add_argument("--quant_residual", type=int, default=quant.residual,
                       help=f"--quant kivi, gear: newest tokens kept in full precision, a multiple of --quant_group "
                            f"(default {quant.residual})")
    group.add_argument("--quant_key_order", choices=("pre_rope", "post_rope"), default=quant.key_order,
                       help="--quant kivi, gear: quantize keys before RoPE (KVQuant's order) or after it (KIVI's code; "
                            f"methods whose keys sit at their original positions only) (default {quant.key_order})")
    group.add_argument("--quant_schedule", choices=("block", "reference"), default=quant.schedule,
                       help="--quant kivi: when tokens are quantized; block: a key and its value together, a block of "
                            "--quant_group at a time (eviction moves them as one); reference: KIVI's code's timing, keys "
                            "--quant_residual at a time and values one at a time (--method full only; with --quant_key_order "
                            "post_rope, as KIVI holds keys) "
                            f"(default {quant.schedule})")
    group.add_argument("--quant_rank", type=int, default=GEAR().rank,
                       help="--quant gear: rank of each block's quantization-error approximation, per head, for keys "
                            f"and values, 1 to --quant_group (default {GEAR().rank})")
    group.add_argument("--read", choices=READ_METHODS, default="none",
                       help="sparse reads next to any --method: quest (Quest, Tang et al. 2024: pages of slots with "
                            "key min/max; each decode step's query heads read only their top pages; nothing is "
                            "evicted) (default none)")
    read = Quest()
    group.add_argument("--quest_budget", type=int, default=read.token_budget,
                       help=f"--read quest: tokens each query head reads per decode step, as whole pages, at least 3 "
                            f"(default {read.token_budget})")
    group.add_argument("--quest_page_size", type=int, default=read.page_size,
                       help=f"--read quest: cache slots per page (default {read.page_size})")
    group.add_argument("--quest_dense_layers", type=int, default=read.dense_layers,
                       help=f"--read quest: leading layers that read every slot (default {read.dense_layers})")
    group.add_argument("--quest_rule", choices=QUEST_RULES, default=read.rule,
                       help="--read quest: whose page rule; quest: Quest's code, max(3, budget // page size) whole "
                            "pages of all slots; kvcache_factory: KVCache-Factory's select_quest_tokens, the newest "
                            "--quest_recent_size slots and the earliest slots of the prefix's top pages, "
                            f"--quest_budget slots exactly (default {read.rule})")
    group.add_argument("--quest_recent_size", type=int, default=read.recent_size,
                       help="--quest_rule kvcache_factory: newest slots always read, within --quest_budget "
                            f"(default {read.recent_size})")
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
                    print(f"note: --{name} is ignored with --quant: {reason}", file=sys.stderr)
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


def _unused_flags(args, option: str, uses: dict) -> None:
    """One-line error for a flag given a value other than its default where ``--<option>`` does not read it
    (``uses``: flag name -> (default, the ``--<option>`` values that read it)), so a run is never silently
    other than the one asked for."""
    chosen = getattr(args, option, "none")
    for name, (default, readers) in uses.items():
        value = getattr(args, name, default)
        if value != default and chosen not in readers:
            raise ConfigError(f"--{name} {value} needs --{option} {' or '.join(readers)}; "
                              f"--{option} {chosen} does not use it")


def quant_setting(args) -> Optional[KIVI]:
    """The ``--quant`` flags as a :class:`lacache_core.quant.KIVI`, or ``None`` (one-line errors for bad values)."""
    quant, both = KIVI(), ("kivi", "gear")
    _unused_flags(args, "quant", {"quant_bits": (quant.bits, both), "quant_group": (quant.group, both),
                                  "quant_residual": (quant.residual, both), "quant_key_order": (quant.key_order, both),
                                  "quant_schedule": (quant.schedule, both), "quant_rank": (GEAR().rank, ("gear",))})
    return quant_config(getattr(args, "quant", "none"), getattr(args, "quant_bits", 2), getattr(args, "quant_group", 32),
                        getattr(args, "quant_residual", 128), getattr(args, "quant_key_order", "pre_rope"),
                        getattr(args, "quant_rank", None), getattr(args, "quant_schedule", "block"))


def quant_identity(args) -> Optional[dict]:
    quant = quant_setting(args)
    if quant is None:
        return None
    defaults = {name: getattr(KIVI(), name) for name in ("key_order", "schedule")}  # left out at these: old hashes hold
    fields_ = {k: v for k, v in asdict(quant).items() if defaults.get(k, object()) != v}
    return {"method": args.quant, **fields_}


def read_setting(args) -> Optional[Quest]:
    """The ``--read`` flags as a :class:`lacache_core.quest.Quest`, or ``None`` (one-line errors for bad values)."""
    default = Quest()
    _unused_flags(args, "read", {"quest_budget": (default.token_budget, ("quest",)),
                                 "quest_page_size": (default.page_size, ("quest",)),
                                 "quest_dense_layers": (default.dense_layers, ("quest",)),
                                 "quest_rule": (default.rule, ("quest",)),
                                 "quest_recent_size": (default.recent_size, ("quest",))})
    return read_config(getattr(args, "read", "none"), getattr(args, "quest_budget", default.token_budget),
                       getattr(args, "quest_page_size", default.page_size),
                       getattr(args, "quest_dense_layers", default.dense_layers),
                       getattr(args, "quest_rule", default.rule),
                       getattr(args, "quest_recent_size", default.recent_size))


def read_identity(args) -> Optional[dict]:
    read = read_setting(args)
    if read is None:
        return None
    later = {"rule": Quest().rule, "recent_size": Quest().recent_size}  # left out at these: old hashes hold
    return {"method": args.read, **{k: v for k, v in asdict(read).items() if later.get(k, object()) != v}}


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
    quant = quant_setting(args)
    if quant is not None:
        tag += f"_gear{quant.bits}rank{quant.rank}" if isinstance(quant, GEAR) else f"_kivi{quant.bits}"
        tag += ("" if (quant.group, quant.residual) == (KIVI().group, KIVI().residual)
                else f"g{quant.group}r{quant.residual}") + \
            ("_postrope" if quant.key_order == "post_rope" else "") + \
            ("_refschedule" if quant.schedule == "reference" else "")
    read = read_setting(args)
    if read is not None:
        tag += f"_quest{read.token_budget}" + ("" if (read.page_size, read.dense_layers) == (Quest().page_size,
                                                                                           Quest().dense_layers)
                                              else f"p{read.page_size}d{read.dense_layers}") + \
            ("" if read.rule == Quest().rule else f"_kvcf{read.recent_size}")
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
