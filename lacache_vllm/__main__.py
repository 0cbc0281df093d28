"""``python -m lacache_vllm``: the ``kv_compression`` keys of every method the plugin runs, from the methods' own
fields (type, default, range and the docstring's description), and the methods it refuses, with the reason."""
from __future__ import annotations

import sys
from dataclasses import MISSING, fields

from harness.flags import field_docs
from lacache_core.params import BOUNDS, base_type, choices_of, describe_range, type_hints
from lacache_core.policies import METHODS, budget_derived

from .settings import CONFIG_KEY, NOT_IN_ENGINE, SUPPORTED, refusal


def describe(method: str) -> list:
    cls = METHODS[method]
    hints, docs = type_hints(cls), field_docs(cls)
    lines = [f"{method} ({cls.__name__}):"]
    if budget_derived(cls):
        lines.append("  cache_size  int  slots per layer, sinks included (sets recent_size = cache_size - start_size)")
    for f in fields(cls):
        if not f.init or not f.metadata.get("flag", True) or f.name in NOT_IN_ENGINE:
            continue
        choices = choices_of(hints[f.name])
        fixed = {k: v for k, v in f.metadata.items() if k in BOUNDS and v is not None and not callable(v)}
        valid = f"one of {list(choices)}" if choices else describe_range(**fixed)
        depends = any(callable(f.metadata.get(k)) for k in BOUNDS)
        default = None if f.default is MISSING else f.default
        kind = getattr(base_type(hints[f.name]), "__name__", str(hints[f.name]))
        doc = " ".join(docs.get(f.name, "").split())
        lines.append(f"  {f.name}  {kind}  default {default!r}, {valid}{' (and a bound set by another key)' if depends else ''}"
                     f"{': ' + doc if doc else ''}")
    return lines


def main() -> None:
    out = [f"additional_config={{\"{CONFIG_KEY}\": {{\"method\": ..., <key>: <value>, ...}}}} (docs/vllm.md)", ""]
    for method in SUPPORTED:
        out += describe(method) + [""]
    out.append("refused inside vLLM:")
    out += [f"  {m}: {refusal(m)}" for m in METHODS if m not in SUPPORTED]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
