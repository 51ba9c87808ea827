"""What a test measured, written to a results file when asked (`WISP_RESULTS_DIR`), so the README's
reliability figures come from a file a command wrote, not from a console log. A plain test run writes
nothing; `python tools/reliability.py` sets the folder and runs the tests that record.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def record(name: str, figures: dict[str, Any] | None = None, **more: Any) -> None:
    """Merge `figures` into `<WISP_RESULTS_DIR>/<name>.json`, stamped with when and where (nothing when the
    variable is unset)."""
    folder = os.environ.get("WISP_RESULTS_DIR")
    if not folder:
        return
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(figures or {}, **more)
    data.update(recorded=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=platform.machine(),
                cpus=os.cpu_count())
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
