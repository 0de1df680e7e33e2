"""The batch mode: a jobs file in, a results file out (``dispatcher run``).

    source.py   the jobs file as the engine's source (read in a thread, or by the compose process)
    ledger.py   the results file as the engine's ledger (claims by id, one row per job)
    journal.py  the results file itself: append, fsync, the index of ids done
    runner.py   ``dispatcher run``: the engine over that source and ledger
"""
