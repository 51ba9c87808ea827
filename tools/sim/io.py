"""CSV and JSON writers for the experiments' outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> Path:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path
