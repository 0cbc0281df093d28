"""The one runner behind ``ppl/``, ``longbench/``, ``niah/`` and ``ruler/``.

A benchmark folder keeps its own arguments, data, prompts and metrics; the prediction loop is
:mod:`harness.loop`, and this module owns the rest:

* the model flags (``--model_name_or_path``, also spelled ``--model_name`` and ``--model``; dtype,
  device, attention kernel) and the output flags;
* loading the model, under ``torchrun`` on this rank's device, with position shift installed;
* budget checks before the first sample (:func:`check_budgets`);
* result folders named by a readable tag and the hash of the complete setting, with ``run.json``
  (arguments, setting, versions, git commit, date) and a one-line refusal when a folder holds
  another setting (:class:`Run`);
* tqdm progress on rank 0 only (:func:`progress`);
* the one-line error exit (:func:`cli`).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from lacache_core.errors import ConfigError

from .flags import ArgumentParser, as_flags, check_method_flags
from .identity import differences, digest, model_identity, normalise
from .models import DEFAULT_MODEL, DTYPES, device_arg
from .records import init_distributed, local_device
from .runlog import run_record, write_json

MODEL_FLAGS = ("--model_name_or_path", "--model_name", "--model")
ATTENTION = ("eager", "sdpa", "flash_attention_2")


def add_model_flags(group, default: Optional[str] = DEFAULT_MODEL, names=MODEL_FLAGS,
                    help: Optional[str] = None) -> None:
    """The model and how it runs. Every spelling of the model flag sets ``args.model_name_or_path``; two
    spellings naming different models are an error."""
    group.add_argument(*names, dest="model_name_or_path", default=default, action=OneOfSpellings,
                       help=help or f"hub name, local folder, or {DEFAULT_MODEL!r} (embedded SmolLM2-135M-Instruct, "
                                    "offline; the default)")
    add_runtime_flags(group)


class OneOfSpellings(argparse.Action):
    """A flag with several spellings (the official scripts' ``--model_name``, ``--model``): two of them given
    different values is a one-line error, not "the last one wins"."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_spelling_" + self.dest, None)
        if seen is not None and seen[0] != option_string and seen[1] != values:
            raise argparse.ArgumentError(self, f"{option_string} {values!r} contradicts {seen[0]} {seen[1]!r}: "
                                               "both name the model; give one")
        setattr(namespace, "_spelling_" + self.dest, (option_string, values))
        setattr(namespace, self.dest, values)


def add_runtime_flags(group) -> None:
    group.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and cache dtype")
    group.add_argument("--device", type=device_arg, default=None,
                       help="cpu, cuda, cuda:N or auto (device_map; default: cuda if available); one present here")
    group.add_argument("--attn_implementation", default=None, choices=ATTENTION,
                       help="attention kernel (default: the model's)")


def add_batch_flag(group) -> None:
    group.add_argument("--batch_size", type=int, default=1,
                       help="answer N prompts at once, longest first: left-padded into one cache, each row under its "
                            "own budget; each row gives what it gives alone (float32); every method (default 1)")


def check_batch_flags(args) -> None:
    """One-line errors for the prompt harnesses' ``--batch_size``, before any model is loaded."""
    from lacache_core.versions import MODERN_ATTENTION

    size = getattr(args, "batch_size", 1)
    if size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {size}")
    if size == 1:
        return
    if getattr(args, "prefill_chunk_size", None) is not None:
        raise ConfigError(f"--prefill_chunk_size cannot be used with --batch_size {size}: the rows of a batch would "
                          "be cut at different places of their own prompts; use one of the two")
    for method in getattr(args, "methods", []):
        if method != "full" and not MODERN_ATTENTION:
            raise ConfigError(f"--batch_size {size} with --method {method} needs transformers >= 4.48 (prompts of "
                              "different lengths are left-padded); use --batch_size 1")


def batch_setting(args) -> dict:
    """``--batch_size`` where it is part of a run's setting: above 1 (batch-1 runs keep their hashes)."""
    size = getattr(args, "batch_size", 1)
    return {"batch_size": size} if size > 1 else {}


def batch_tag(args) -> str:
    size = getattr(args, "batch_size", 1)
    return f"_bs{size}" if size > 1 else ""


def add_skip_flag(group) -> None:
    group.add_argument("--skip_bad_rows", action="store_true",
                       help="leave out data rows that are not JSON or lack a field (default: stop with an error); "
                            "they are counted in run.json and listed at the end")


def add_output_flags(group, default: str) -> None:
    group.add_argument("--output_dir", default=default, help=f"results root (default {default})")


def add_official_method_flag(group) -> None:
    group.add_argument("--enable_lacache", action="store_true", help="the official flag: same as --method lacache")


def apply_official_method_flag(args) -> None:
    """``--enable_lacache`` (the LaCache repository's scripts) as ``--method lacache``; a ``--method`` that does not
    run lacache contradicts it and is a one-line error rather than silently winning."""
    if not getattr(args, "enable_lacache", False):
        return
    if args.method is None:
        args.method = "lacache"
    elif "lacache" not in [m.strip() for m in args.method.split(",")]:
        raise ConfigError(f"--enable_lacache means --method lacache, but --method is {args.method!r}; give one of the "
                          "two (or a --method list that includes lacache)")


def check_run_flags(args) -> None:
    """One-line errors for the shared flags, and the device default."""
    if hasattr(args, "method"):
        check_method_flags(args)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_output_folder(args.output_dir)


def _file_above(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` when it is a file (nothing can be made under it)."""
    above = next((p for p in path.parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def check_output_folder(path, flag: str = "--output_dir") -> None:
    """One-line error, before any work, when the folder a CLI writes into cannot be one: it is a file, or
    lies under one (a run would otherwise fail at its first write, or at its end)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder")
    above = _file_above(path)
    if above is not None:
        raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")


def check_output_file(path, flag: str = "--output") -> None:
    """One-line error, before any work, when the file a CLI writes at its end cannot be written there: it
    is a folder, or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, not a file")
    above = _file_above(path)
    if above is not None:
        raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")


def load(args, position_shift: bool = True):
    """``(model, tokenizer)`` for ``args``; sets ``args.rank``, ``args.world`` and ``args.model_identity``."""
    from .models import load_model

    args.rank, args.world = init_distributed()
    model, tokenizer = load_model(args.model_name_or_path, args.dtype, local_device(args.device),
                                  args.attn_implementation)
    if position_shift:
        from lacache_core import enable_position_shift
        enable_position_shift(model)
    args.model_identity = model_identity(args.model_name_or_path, model)
    return model, tokenizer


def check_budgets(args, model, prompt_len: int, spec_for: Callable) -> None:
    """Build every method's cache for a ``prompt_len``-token prompt once, so that an impossible budget is
    one error line before the first sample rather than after hours."""
    for method in args.methods:
        if method != "full":
            spec_for(method, prompt_len).make(model, prompt_len)


def progress(items: Iterable, desc: str, rank: int = 0, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, disable=rank > 0, **kwargs)


def recorded_args(args) -> dict:
    """The command line's values for ``run.json`` (internal attributes left out)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("model_identity",)}


def safe_name(text: str, limit: int = 160) -> str:
    """One path component made of user input (model, data and method names): only letters, digits and
    ``._=+-``, no leading dot, at most ``limit`` characters, so that it stays inside the output folder."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).lstrip(".") or "_"
    return name[:limit]


class Run:
    """One setting's result folder: ``{root}/{name}-{hash of setting}``.

    Opening it checks the ``run.json`` already there: the same setting resumes (the benchmark's
    records skip what is done); another setting under the same name and hash (or an older folder
    without a recorded setting) is refused in one line naming what differs.
    """

    def __init__(self, root: Path, name: str, setting: dict, args, rank: int = 0):
        self.setting = normalise(setting)
        self.folder = Path(root) / f"{safe_name(name)}-{digest(self.setting)}"
        self.path = self.folder / "run.json"
        self.args, self.rank = args, rank
        self.previous = self._read()

    def _read(self) -> Optional[dict]:
        if not self.path.exists():
            return None
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.path}: unreadable run record ({type(err).__name__}); move the folder away "
                              "to rerun") from None
        if old.get("setting") != self.setting:
            diff = differences(old.get("setting") or {}, self.setting)
            raise ConfigError(f"{self.folder} holds another setting ({'; '.join(diff[:3]) or 'no setting recorded'}); "
                              "use another --output_dir or move that folder away")
        return old

    @property
    def complete(self) -> bool:
        return bool(self.previous and self.previous.get("complete"))

    def start(self, **info) -> Path:
        """Write ``run.json`` (rank 0): arguments, setting, versions, git commit, date, ``info``."""
        if self.rank == 0:
            write_json(self.path, run_record(recorded_args(self.args), setting=self.setting, complete=False, **info))
        return self.folder

    def finish(self, **results) -> None:
        """Rewrite ``run.json`` with the results, marked complete."""
        if self.rank == 0:
            write_json(self.path, run_record(recorded_args(self.args), setting=self.setting, complete=True,
                                             **results))


def run_main(body: Callable[[Optional[list]], int], argv=None) -> int:
    """Run ``body(argv)``, turning a :class:`ConfigError` (a bad flag or setting) into one ``error:`` line
    and exit code 2; a setting the library names (``KIVI.bits``) is said as its flag (``--quant_bits``)."""
    try:
        return body(argv)
    except ConfigError as err:
        print(f"error: {as_flags(str(err))}", file=sys.stderr)
        return 2


def cli(parse: Callable[[Optional[list]], object], body: Callable[[object], int],
        validate: Optional[Callable[[object], None]] = None) -> Callable[..., int]:
    """``main(argv=None)`` of a harness: parse, validate, run, all under :func:`run_main`."""
    def main(argv=None) -> int:
        def run(argv):
            args = parse(argv)
            if validate is not None:
                validate(args)
            return body(args)
        return run_main(run, argv)
    return main


__all__ = ["ArgumentParser", "Run", "add_batch_flag", "add_model_flags", "add_official_method_flag", "apply_official_method_flag", "add_output_flags", "add_runtime_flags", "add_skip_flag",
           "batch_setting", "batch_tag", "check_batch_flags", "check_budgets", "check_output_file", "check_output_folder", "check_run_flags", "cli", "load", "progress", "recorded_args", "run_main"]
