"""What a run is, apart from how it trains: its config and validation, its claim on its directory,
its results.json, its heartbeat, and the one lifecycle that every launcher and the lockstep group
follow (:mod:`~crisp.runs.lifecycle`: claim, skip if completed, train, record, write)."""
