"""Run records: every run writes its arguments, library versions and results next to its outputs."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict

from .versions import library_versions


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def run_record(args: Dict[str, Any], **results) -> Dict[str, Any]:
    return {"args": args, "versions": library_versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **results}
