"""Benchmarks, each a module of this package; ``python -m crisp.bench WHAT`` runs one and writes JSON.

- :mod:`~crisp.bench.attention`: ``attention``, one training step per attention implementation (dense
  eager, SDPA, crisp at s=0 and s=0.8), and ``kernel``, the attention-probability step alone;
- :mod:`~crisp.bench.grid`: ``sweep`` (a grid against one-at-a-time untuned runs), ``grid`` (a
  ``crisp.run`` command timed from start to report, beside a Hugging Face ``Trainer`` peer) and ``peer``;
- :mod:`~crisp.bench.step`: ``step``, a lockstep group's training step timed and taken apart.

Measured numbers live in ``docs/performance.md`` and the results folders, not here.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
