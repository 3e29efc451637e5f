"""Where scalars go: `metrics.jsonl` on rank 0 (one JSON object per logged step), whatever else is on."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends one line per logged step; opened only on the main process."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps every full line

    def log(self, record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._file.close()


def format_line(step: int, steps: int, record: dict) -> str:
    """The short progress text printed on the bar and in logs."""
    return (f"step {step}/{steps}  loss D {record['loss/D']:.3f} G {record['loss/G']:.3f}  "
            f"D(x) {record['D/real']:.2f} D(G(z)) {record['D/fake_before']:.2f}  "
            f"{record['perf/img_per_s']:.0f} img/s")
