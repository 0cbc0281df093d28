"""Run records: every run writes its arguments, library versions and results next to its outputs."""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Dict

from .versions import library_versions


def process_rss_bytes() -> int:
    """Resident memory of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def run_record(args: Dict[str, Any], **results) -> Dict[str, Any]:
    return {"args": args, "versions": library_versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **results}
