"""One delivery engine for ``run`` and ``worker``.

    engine.py   Engine(source, ledger, composer, sender).run() -> Tally
    ports.py    what it is plugged into: a Source of jobs, a Ledger that judges and records them
    outcome.py  how one job ended (Outcome), and the row of results it becomes
    tally.py    what it counts, for the progress display and the metrics
"""
