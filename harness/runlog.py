"""Run records: every run writes its arguments, library versions, git commit and results next to its outputs."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]


def process_rss_bytes() -> int:
    """Resident memory of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def library_versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("datasets", "accelerate", "flash_attn", "gguf", "numpy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


@lru_cache(maxsize=1)
def git_state() -> Optional[Dict[str, Any]]:
    """``{"commit", "dirty"}`` of the checkout this harness runs from (``None`` outside a git checkout)."""
    def git(*cmd):
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def run_record(args: Dict[str, Any], **results) -> Dict[str, Any]:
    return {"args": args, "versions": library_versions(), "git": git_state(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **results}
