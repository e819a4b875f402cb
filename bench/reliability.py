"""Rows of the reliability report, written by the fault and bad-input tests.

Each test records one row (fault or input class, the load during it, what users saw,
what was lost) into `bench/reports/reliability.json`, keyed by row name so a partial run
updates only its rows. `python -m bench.reliability_report` renders docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "bench" / "reports" / "reliability.json"
DOC = ROOT / "docs" / "reliability.md"


def load_rows(path: Path = ROWS) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record(name: str, *, fault: str, load: str, saw: str, lost: str, seconds: float,
           order: int = 50, path: Path = ROWS) -> None:
    """Store one row (replacing an earlier one of the same name)."""
    if os.environ.get("EVENTPULSE_TEST_REDIS") == "cluster":  # the same test, other Redis
        name, fault, order = f"{name}-cluster", f"{fault} — on a 3-master Redis Cluster", order + 1
    rows = load_rows(path)
    rows[name] = {"fault": fault, "load": load, "saw": saw, "lost": lost,
                  "seconds": round(seconds, 1), "order": order, "recorded_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, sort_keys=True))
