"""What a lockstep group takes from its launcher's settings.

The values come from the launcher's yaml (``conf/hydra/launcher/lockstep.yaml`` holds their one default),
checked and built by the sweep (:mod:`crisp.sweep.options`) and handed to
:func:`crisp.lockstep.group.train_group`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GroupOptions:
    row_width: int  # tokens per packed row (a longer example widens the rows)
    pack_workers: int | str  # processes that pack the next batches while the device trains; "auto": 2 on GPU, 0 on CPU
    callbacks: tuple[Any, ...] = ()  # Lightning callbacks for the group's Trainer (not a setting: crisp.bench's timer)
    sweep_id: str | None = None  # the sweep the runs belong to (their W&B runs carry it): set by the sweep
