"""Per-call records that stay bounded: a model served for days is called millions of times, and a
plot or a benchmark needs only the calls of one run."""
from __future__ import annotations

import collections

RECENT_CALLS = 10_000        # records kept; the oldest go first


class RecentRecords(collections.deque):
    """The last RECENT_CALLS records appended; `total` counts every record appended since the
    last `clear()`, so step numbers keep counting after old records are dropped."""

    def __init__(self, records=(), maxlen: int = RECENT_CALLS):   # deque's copy/pickle signature
        super().__init__(records, maxlen)
        self.total = len(self)

    def append(self, record) -> None:
        super().append(record)
        self.total += 1

    def clear(self) -> None:
        super().clear()
        self.total = 0

    def __getitem__(self, index):
        """Index like a deque, and slice like a list (a list back)."""
        if isinstance(index, slice):
            return list(self)[index]
        return super().__getitem__(index)

    def __reduce__(self):       # copy and pickle: the records, then `total` as it was
        return type(self), (list(self), self.maxlen), {"total": self.total}
