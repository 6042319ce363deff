"""Lockstep training: a whole group of runs trained as one fused model, one step for all of them.

A grid of small encoders leaves a GPU mostly idle when each run is its own process: every run pays
the same few hundred small kernel launches per step. Here the runs of a group share every launch.
The run dimension is folded into the batch and only the leaf modules that hold parameters or
randomness are swapped for fused versions (:mod:`~crisp.lockstep.fused`, :mod:`~crisp.lockstep.dropout`,
:mod:`~crisp.lockstep.layer_norm`); examples are packed into rows (:mod:`~crisp.lockstep.packing`); each
run keeps its own seed, batch order (:mod:`~crisp.lockstep.batches`), sparsity, statistics and results
(:mod:`~crisp.lockstep.fused_classifier`, :mod:`~crisp.lockstep.group`, which puts the group through the
one run lifecycle of :mod:`crisp.core.lifecycle`). An encoder family's particulars (token types, first
position, attention modules) come from :mod:`crisp.sparsity.families`; whether a model fuses at all, and why
not, from :mod:`~crisp.lockstep.fusable`. Which jobs form a group is the launchers' business, a layer above
(``crisp/sweep/lockstep_launcher.py``).
"""
