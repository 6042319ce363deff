"""The core every run shares, apart from how it trains: its config and checks, its claim on its
directory, its results.json, its heartbeat, its errors, the report's tables, and the one lifecycle that
every launcher and the lockstep group follow (:mod:`~crisp.core.lifecycle`: claim, skip if completed,
train, record, write). It imports nothing of crisp but :mod:`crisp.sparsity`, and no torch."""
