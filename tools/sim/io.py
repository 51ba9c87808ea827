"""CSV and JSON writers for the experiments' outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _number(value: str):
    """A CSV cell as the int or float it was written from (else the string)."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def with_earlier_systems(path: Path, rows: list[dict], systems) -> list[dict]:
    """`--update`: the rows of an earlier run (`path`) for the systems not re-run now, and `rows` for those
    that were, in the earlier file's order of systems (re-running one system after a change keeps the
    others' measurements and their place in the tables and plots)."""
    if not path.exists():
        return rows
    with open(path, newline="") as f:
        earlier = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    merged = [r for r in earlier if r.get("system") not in set(systems)] + rows
    order = list(dict.fromkeys(r.get("system") for r in earlier + rows))
    return sorted(merged, key=lambda r: order.index(r.get("system")))  # stable: a system's rows keep their order


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
