"""Many machines, one Redis: jobs on a Redis Stream, sent by any number of workers.

    keys.py       the key names derived from one stream
    scripts.py    the Lua scripts that make each step atomic
    store.py      the connection, retrying while Redis restarts, the result row
    enqueue.py    ``dispatcher enqueue``: validate a jobs file and append its jobs
    worker.py     ``dispatcher worker``: read, send, settle
    ratelimit.py  ``pool.rate_limit`` across workers (a token bucket in Redis)
    requeue.py    ``dispatcher requeue``: dead (or invalid) jobs back on the stream
    report.py     ``dispatcher status`` and ``dispatcher results``
    commands.py   the command-line entry points of the commands above
"""
