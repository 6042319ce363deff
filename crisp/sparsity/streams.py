"""Each run's own random stream for the sparsifiers that draw (``random``).

A run's draws are a function of its seed, the training step, the call site (the layer, and how many
times that layer has drawn since the step began) and *what* is drawn for: the example (counted within
the run's block of the batch), the head, the query's and the key's positions in the example. Never of
the batch's other runs, of the device, or of how examples are laid out in rows: a run draws the same
keys alone, in a lockstep group, and with its sentences packed several to a row (given their
:class:`TokenPlaces`), on the CPU and on a GPU.

The numbers come from a counter-based hash (Wellons' ``lowbias32``, a bijection on 32 bits) computed
with int64 tensor ops that never overflow, so CPU and GPU give the same bits; the step lives on the
device, so a CUDA graph's replay draws anew after ``next_step()`` advanced it inside the graph.

The stream reaches the attention function by context, as :func:`crisp.sparsity.attention.batch_of_runs`
does the batch's runs: training wraps each forward in ``with random_stream(stream):`` and calls
``stream.next_step()`` once per training step before it. Lockstep's
:class:`crisp.lockstep.dropout.RunRandom` is a :class:`RunStreams` (its dropout keeps streams of its own).
Without a stream, a single run draws from torch's global generator (reproducible by ``torch.manual_seed``,
as dropout is); a batch of several runs refuses to.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# distinct starting points of the hash chains: what a number is drawn for, so that no two chains meet
_STREAM_SALT, _KEY_SALT = 0x5851F42D, 0x2545F491


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in 16-bit halves: no product reaches 2**63."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values: a bijection, so distinct inputs never tie."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix(state: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """The chain's next state: absorbs a value of up to 64 bits (its high half, then its low half). A Python
    int stays on the host (a scalar operand: no copy to the device, which a CUDA graph's capture forbids)."""
    state = hash32(state ^ ((value >> 32) & _MASK32))
    return hash32(state ^ (value & _MASK32))


@dataclass
class TokenPlaces:
    """Where each token of a batch comes from, when its rows do not hold one example each from position 0
    (lockstep packs several sentences into a row): the token's example, counted within its run's block
    of the batch, and its position in that example, each ``(batch, length)``."""

    example: torch.Tensor
    position: torch.Tensor


class RunStreams:
    """The random streams of the runs whose rows a batch holds (one run: a list of one seed)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.seeds = torch.tensor(list(seeds), dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self._draws: dict[int, int] = {}  # per layer: draws since the step began

    def next_step(self) -> None:
        """A training step begins: on the device, so that a CUDA graph's replay advances it too."""
        self.step.add_(1)
        self._draws.clear()

    def keep_runs(self, keep: list[int]) -> None:
        self.seeds = self.seeds[torch.tensor(keep, device=self.seeds.device)]

    def _site(self, layer: int) -> int:
        draw = self._draws.get(layer, 0)
        self._draws[layer] = draw + 1
        return draw

    def priorities(self, shape: torch.Size, layer: int, places: TokenPlaces | None = None) -> torch.Tensor:
        """One random 32-bit number (int64) per ``(batch, heads, queries, keys)`` entry of the next draw of
        ``layer``: the batch's rows are one equal block per seed, each block drawn from its run's stream.
        Within a row the numbers of distinct key positions are distinct (no ties)."""
        batch, heads, queries, keys = shape
        runs = len(self.seeds)
        if batch % runs:
            raise ValueError(f"a batch of {batch} rows cannot hold {runs} runs' equal blocks")
        device = self.seeds.device
        per_run = batch // runs
        state = _mix(torch.full_like(self.seeds, _STREAM_SALT), self.seeds)
        state = _mix(_mix(_mix(state, self.step), layer), self._site(layer))  # [runs]
        rows = torch.arange(batch, device=device)
        if places is None:
            example = (rows % per_run)[:, None].expand(batch, queries)
            query_position = torch.arange(queries, device=device).expand(batch, queries)
            key_position = torch.arange(keys, device=device).expand(batch, keys)
        else:
            example, query_position, key_position = places.example, places.position, places.position
        state = state[rows // per_run][:, None, None]  # [batch, 1, 1]
        state = _mix(state, example[:, None, :])  # [batch, 1, queries]
        state = _mix(state, torch.arange(heads, device=device)[None, :, None])  # [batch, heads, queries]
        state = _mix(state, query_position[:, None, :])
        key = hash32(key_position ^ _KEY_SALT)[:, None, None, :]  # [batch, 1, 1, keys]
        return hash32(state[..., None] ^ key)


# The stream of the runs whose forward is running, and where their tokens come from (see the module).
_STREAM: ContextVar[tuple[RunStreams, TokenPlaces | None] | None] = ContextVar("crisp_stream", default=None)


@contextmanager
def random_stream(stream: RunStreams, places: TokenPlaces | None = None) -> Iterator[None]:
    """Every crisp attention call inside draws from ``stream`` (for tokens laid out as ``places`` say)."""
    token = _STREAM.set((stream, places))
    try:
        yield
    finally:
        _STREAM.reset(token)


def priorities(shape: torch.Size, device: torch.device, runs: int, layer: int) -> torch.Tensor:
    """The next draw's random priorities for a batch of ``runs`` runs, from the stream in context
    (without one: torch's global generator, for a single run only)."""
    current = _STREAM.get()
    if current is None:
        if runs != 1:
            raise ValueError(f"a batch of {runs} runs draws from each run's own stream: run its forward inside "
                             "crisp.sparsity.streams.random_stream(RunStreams(seeds, device))")
        return torch.rand(shape, device=device)
    stream, places = current
    if len(stream.seeds) != runs:
        raise ValueError(f"the random stream holds {len(stream.seeds)} run(s) for a batch of {runs} run(s)")
    return stream.priorities(shape, layer, places)
