"""The Redis keys of one jobs stream.

For the default stream ``dispatcher:jobs`` (every name derives from the stream):

    dispatcher:jobs            the jobs: entries {id, line, job}; deleted once acknowledged
    dispatcher:jobs:results    one entry {r: results-file row} per finished id
    dispatcher:jobs:dead       entries {id, line, job, reason, deliveries}
    dispatcher:jobs:invalid    entries {id, line, job ('' when invalid at enqueue), row: its results entry}
    dispatcher:jobs:ids        hash: every id ever enqueued -> its line (enqueue adds nothing twice)
    dispatcher:jobs:lines      set: invalid lines without an id of their own (by line + digest)
    dispatcher:jobs:done       hash: id -> sent | failed | invalid
    dispatcher:jobs:stats      hash: enqueued, rejected, sent, failed, invalid, dead
    dispatcher:jobs:errors     hash: id -> why its last delivery did not finish it
    dispatcher:jobs:finished:<unix second>   jobs finished in that second (expire in 2 min)
    dispatcher:jobs:rate       the shared rate limiter's theoretical arrival time (GCRA)
    dispatcher:jobs:worker:<name>   held by the live worker of that --name (expires if it dies)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STREAM = "dispatcher:jobs"
DEFAULT_GROUP = "dispatcher"


@dataclass(frozen=True, slots=True)
class Keys:
    stream: str

    @property
    def results(self) -> str:
        return f"{self.stream}:results"

    @property
    def dead(self) -> str:
        return f"{self.stream}:dead"

    @property
    def invalid(self) -> str:
        return f"{self.stream}:invalid"

    @property
    def ids(self) -> str:
        return f"{self.stream}:ids"

    @property
    def lines(self) -> str:
        return f"{self.stream}:lines"

    @property
    def done(self) -> str:
        return f"{self.stream}:done"

    @property
    def stats(self) -> str:
        return f"{self.stream}:stats"

    @property
    def errors(self) -> str:
        return f"{self.stream}:errors"

    @property
    def finished(self) -> str:
        return f"{self.stream}:finished"

    @property
    def rate(self) -> str:
        return f"{self.stream}:rate"

    def worker(self, name: str) -> str:
        return f"{self.stream}:worker:{name}"
