"""``--model_args`` of the lm-eval model: our method, budget, quantizer and reader settings, under the names,
defaults and ranges of our command lines (parsed by the same flags), and the model's own HFLM arguments."""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Dict, Tuple

from lacache_core.errors import ConfigError
from lacache_core.policies import METHODS

from ..flags import ArgumentParser, add_method_flags, as_flags, check_method_flags, method_settings

#: Where a continuation's scoring meets the compressed cache, and how rolling documents stream (see docs/lm_eval.md).
OWN = {
    "compress_before": (int, 1, 0, "the last N context tokens of a log-likelihood request are read after the "
                                   "cache is compressed; 0: the whole context is prefilled, then compressed"),
    "rolling_chunk": (int, 1, 1, "tokens fed per forward pass when a rolling request streams its document"),
}
#: HFLM's keyword arguments that reach ``from_pretrained`` rather than HFLM itself
MODEL_LOADING = ("attn_implementation",)


@dataclass(frozen=True)
class CacheArgs:
    """The parsed cache settings: ``args`` as our harnesses hold them, and the lm-eval model's own options."""

    args: object
    compress_before: int
    rolling_chunk: int

    @property
    def method(self) -> str:
        return self.args.methods[0]

    @property
    def compresses(self) -> bool:
        """Whether any request runs on a :class:`lacache_core.CompressedCache` (a method, a quantizer or a reader)."""
        settings = method_settings(self.args, self.method)
        return self.method != "full" or settings["quant"] is not None or settings["read"] is not None


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="model_args", add_help=False)
    add_method_flags(parser, default_method="full", budget=1.0, prefill_chunks=False)
    return parser


def cache_arg_names() -> set:
    """Every ``--model_args`` name that sets the cache (our flags' names)."""
    return {action.dest for action in _parser()._actions if action.dest != "help"} | set(OWN)


def in_model_args(message: str) -> str:
    """A harness message (flags such as ``--cache_size``, or a library setting) said in ``--model_args`` terms."""
    return "model_args: " + re.sub(r"--(?:no_)?(\w+)", r"\1", as_flags(message))


def split_model_args(kwargs: dict, hflm_init) -> Tuple[Dict[str, object], Dict[str, object]]:
    """``(ours, HFLM's)`` of the model's keyword arguments; a name that neither takes is a one-line error."""
    ours_names = cache_arg_names()
    theirs_names = set(inspect.signature(hflm_init).parameters) - {"self", "kwargs"} | set(MODEL_LOADING)
    unknown = [k for k in kwargs if k not in ours_names and k not in theirs_names]
    if unknown:
        name = unknown[0]
        near = difflib.get_close_matches(name, sorted(ours_names | theirs_names), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(f"model_args: unknown argument {name!r}{hint}; see docs/lm_eval.md")
    return ({k: v for k, v in kwargs.items() if k in ours_names},
            {k: v for k, v in kwargs.items() if k not in ours_names})


def parse_cache_args(given: dict) -> CacheArgs:
    """Our settings from ``--model_args`` values (as lm-eval typed them), checked as our command lines check them."""
    # lm-eval types "-1" as a float (only digit strings become ints)
    given = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in given.items()}
    method = given.get("method", "full")
    if method not in METHODS:
        raise ConfigError(f"model_args: method must be one of {sorted(METHODS)}, got {method!r}")
    own = {}
    for name, (kind, default, low, _) in OWN.items():
        value = given.pop(name, default)
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            raise ConfigError(f"model_args: {name} must be an integer >= {low}, got {value!r}")
        own[name] = value
    argv = []
    for name, value in given.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no_{name}")
        else:
            argv += [f"--{name}", str(value)]
    try:
        args = _parser().parse_args(argv)
        check_method_flags(args)
        method_settings(args, args.methods[0])  # the quantizer's and reader's own checks
    except ConfigError as error:
        raise ConfigError(in_model_args(str(error))) from None
    if args.methods[0] != "full" and "cache_size" not in given and "budget" not in given:
        raise ConfigError(f"model_args: method={args.methods[0]} needs cache_size=N (tokens per layer) or budget=F "
                          "(a fraction of each prompt)")
    return CacheArgs(args, **own)
