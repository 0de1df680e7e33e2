"""Many machines, one Redis: jobs on a Redis Stream, sent by any number of workers.

    keys.py       the key names derived from one stream
    scripts.py    the Lua scripts that make each step atomic
    store.py      the connection, retrying while Redis restarts, the result row
    enqueue.py    ``dispatcher enqueue``: validate a jobs file and append its jobs
    source.py     the engine's source: read, claim, hold and touch entries (leases, the worker's name)
    ledger.py     the engine's ledger: confirm a lapsed lease, settle each entry (F, D, R)
    worker.py     ``dispatcher worker``: the engine over that source and ledger
    ratelimit.py  ``pool.rate_limit`` across workers (a token bucket in Redis)
    requeue.py    ``dispatcher requeue``: dead (or invalid) jobs back on the stream
    report.py     ``dispatcher status`` and ``dispatcher results``
"""
