"""Command-line pieces shared by the prompt harnesses (``longbench/``, ``niah/``, ``ruler/``).

Every harness takes the same method flags, so one method can be compared with another on the same
model, data and budget by changing ``--method`` only.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from .errors import ConfigError
from .policies import METHODS


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` (one line naming the flag) instead of printing usage and
    exiting, so that :func:`run_main` reports a bad flag like any other bad setting."""

    def error(self, message):
        raise ConfigError(message)


def add_policy_flags(g) -> None:
    """The methods' own hyper-parameters (every harness, ``ppl/`` included)."""
    g.add_argument("--span", type=int, default=16, help="LaCache ladder span S")
    g.add_argument("--overlap", type=int, default=0, help="LaCache ladder overlap O (0 <= O < S)")
    g.add_argument("--ladder_layout", choices=["official", "paper"], default="official",
                   help="LaCache: official code's layer offsets, or the paper prose's consecutive-layer ladder")
    g.add_argument("--no_compensate", action="store_true",
                   help="LaCache: make the budget a hard cap (the official code lets it reach budget + floor(R/2))")
    g.add_argument("--recent_ratio", type=float, default=0.5, help="H2O: share of the budget for recent tokens")
    g.add_argument("--recent_window", type=int, default=32, help="LSH-E: recent tokens never evicted")
    g.add_argument("--lsh_dim", type=int, default=8, help="LSH-E: SimHash bits")
    g.add_argument("--window_size", type=int, default=32, help="SnapKV/PyramidKV/PyramidInfer: observation window")
    g.add_argument("--kernel_size", type=int, default=7, help="SnapKV/PyramidKV: pooling kernel")
    g.add_argument("--pooling", choices=["max", "avg"], default="max", help="SnapKV/PyramidKV: pooling")
    g.add_argument("--beta", type=int, default=20, help="PyramidKV: budget ratio of first to last layer")
    g.add_argument("--key_positions", choices=["slot", "original"], default=None,
                   help="where kept keys are rotated: their cache slot (position shift) or their original position "
                        "(default: the method's reference; slot for lacache and streamingllm, original for the others)")


def add_method_flags(p: argparse.ArgumentParser, span: int = 16, overlap: int = 0, budget: float = 0.5,
                     start_help: str = "leading tokens kept by every method (default: the official LongBench rule "
                                       "min(128, T - (L+1), C - (L+1)))") -> None:
    """Flags that choose a method and its budget; read them back with :func:`method_settings`."""
    g = p.add_argument_group("method and budget")
    g.add_argument("--method", default="lacache",
                   help=f"comma list of {sorted(METHODS)} (each runs in turn)")
    g.add_argument("--budget", type=float, default=budget,
                   help="cache size as a fraction of the length the harness names (official semantics)")
    g.add_argument("--start_size", type=int, default=None, help=start_help)
    add_policy_flags(g)
    g.set_defaults(span=span, overlap=overlap)
    g.add_argument("--prefill_chunk_size", type=int, default=None,
                   help="feed the prompt N tokens at a time and compact between chunks (bounded memory); "
                        "default: whole prompt, as the official harnesses")
    r = p.add_argument_group("model and run")
    r.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (device_map; default: cuda if available)")
    r.add_argument("--attn_implementation", default=None, choices=[None, "eager", "sdpa", "flash_attention_2"])


def parse_methods(text: str) -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ConfigError(f"--method must be a comma list of {sorted(METHODS)}, got {text!r}")
    return methods


def check_common(args) -> None:
    """One-line errors for the shared flags."""
    if not 0 < args.budget <= 1:
        raise ConfigError(f"--budget must be in (0, 1], got {args.budget}")
    if args.prefill_chunk_size is not None and args.prefill_chunk_size < 1:
        raise ConfigError(f"--prefill_chunk_size must be >= 1, got {args.prefill_chunk_size}")
    if args.start_size is not None and args.start_size < 0:
        raise ConfigError(f"--start_size must be >= 0, got {args.start_size}")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def method_settings(args) -> dict:
    """Hyper-parameters for :func:`lacache_core.build_policy` (each method takes the ones it knows)."""
    return dict(span=args.span, overlap=args.overlap, compensate=not args.no_compensate,
                ladder_layout=args.ladder_layout, recent_ratio=args.recent_ratio, recent_window=args.recent_window,
                lsh_dim=args.lsh_dim, window_size=args.window_size, kernel_size=args.kernel_size,
                pooling=args.pooling, beta=args.beta, key_positions=getattr(args, "key_positions", None))


def method_tag(args, method: str) -> str:
    """Folder-name fragment for a method and the settings that change its results."""
    if method == "full":
        tag = "full"
    else:
        tag = f"{method}_b{args.budget:g}"
        if method == "lacache":
            tag += f"_S{args.span}_O{args.overlap}" + ("_paper" if args.ladder_layout == "paper" else "") + (
                "_nocomp" if args.no_compensate else "")
        elif method == "h2o":
            tag += f"_r{args.recent_ratio:g}"
        if args.start_size is not None:
            tag += f"_s{args.start_size}"
        if getattr(args, "key_positions", None):
            tag += f"_k{args.key_positions}"
    if args.prefill_chunk_size:
        tag += f"_chunk{args.prefill_chunk_size}"
    return tag + ("" if args.dtype == "float32" else f"_{args.dtype}")


def run_main(body: Callable[[Optional[list]], int], argv=None) -> int:
    """Run ``body(argv)``, turning a :class:`ConfigError` into one ``error:`` line and exit code 2."""
    try:
        return body(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
