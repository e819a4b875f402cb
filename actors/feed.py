"""What changed in an event's line, numbered by fact, for replicas that mirror its entries.

A replica that keeps the entries it has read (`serve.mirror`) asks the actor a few times a
second what changed since the fact count it has seen, and applies that to each kept entry:
a change of the entry's own user makes it read again from the actor; an entry that
started or stopped waiting earlier in the order moves the waiting entries behind it by one.
Counts are the line's journal numbering (facts applied since the event began), so they
survive the actor's restarts; a reader whose count the feed no longer covers starts anew.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

# (count after the command, user whose entry changed or None, lane, slot, ±1 or 0)
Change = tuple[int, "str | None", int, int, int]

KEEP = 20_000  # changes kept for readers; one that fell further behind starts anew


class ChangeFeed:
    """Counts are the owner's: facts applied, journaled or on their way to the journal."""

    def __init__(self, count: int, keep: int = KEEP) -> None:
        self.id = os.urandom(6).hex()  # a restarted actor's feed is another one
        self.since = count  # the feed holds every change after this count
        self.keep = keep
        self._log: deque[Change] = deque()

    def record(self, count: int, facts: list[dict[str, Any]],
               moves: list[tuple[int, int, int]]) -> None:
        """One command's facts, applied in this order (`count` facts applied with them),
        and the waiting moves they made."""
        if not facts:
            return
        tag = count
        if any("u" not in f for f in facts):
            # opening (the pre-queue drawn into lanes), closing, configuring: start anew
            self._log.clear()
            self.since = tag
            return
        log = self._log
        log.extend((tag, f["u"], 0, 0, 0) for f in facts)
        log.extend((tag, None, lane, slot, delta) for lane, slot, delta in moves)
        while len(log) > self.keep:
            self.since = log.popleft()[0]

    def after(self, seen: int, count: int) -> list[Change] | None:
        """The changes after count `seen`, oldest first, with `count` facts applied now; None
        when the feed cannot say (the reader fell behind what is kept, or saw facts this
        line never applied)."""
        if seen < self.since or seen > count:
            return None
        out: list[Change] = []
        for change in reversed(self._log):
            if change[0] <= seen:
                break
            out.append(change)
        out.reverse()
        return out
