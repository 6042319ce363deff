"""Lockstep training: a whole group of runs trained as one fused model, one step for all of them.

A grid of small encoders leaves a GPU mostly idle when each run is its own process: every run pays
the same few hundred small kernel launches per step. Here the runs of a group share every launch.
The run dimension is folded into the batch and only the leaf modules that hold parameters or
randomness are swapped for fused versions (:mod:`~crisp.lockstep.fused`, :mod:`~crisp.lockstep.dropout`);
sentences are packed into rows (:mod:`~crisp.lockstep.packing`); each run keeps its own seed, batch
order (:mod:`~crisp.lockstep.data`), sparsity, statistics and results (:mod:`~crisp.lockstep.model`,
:mod:`~crisp.lockstep.group`). Grouping a sweep's jobs is the launcher's business:
:mod:`crisp.sweep.lockstep`.
"""
