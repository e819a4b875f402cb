"""A replica's mirror of the line entries it has read: position reads without an actor call.

Under `ramp` an event's actor spent ~95 % of its time in Ray's per-call machinery and a
position read waited for a call behind the others. A replica now keeps each entry it read
with the fact count the view is exact at, and the entry's place (lane, slot). A follower
asks the actor every `POLL_S` what changed since the count it has seen (`actors.feed`);
one small call replaces hundreds of reads. A kept entry is then answered here:

- a change of the entry's own user (joined again, left, offered, bought, expired…) drops
  it: the next read goes to the actor;
- an entry that started or stopped waiting ahead of it (an earlier slot of its lane, or
  any slot of a lane served before it) moves its position by one, so positions stay exact;
- the ETA divides the position by the outflow the actor reported with the changes.

Only while the mirror is complete: the line's journal writes how many facts are durable
(`keys.line_durable`) with every record, and a read answers from the mirror only when it
has seen at least that many (a write acknowledged to anyone, on any replica, is journaled
first, so a reader sees its own writes), and only while the actor answered the follower in
the last `FRESH_S`. Otherwise the read goes to the actor, as before.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

POLL_S = 0.05   # the follower asks the actor what changed this often
FRESH_S = 0.5   # answer from the mirror only while the actor answered this recently
IDLE_S = 15.0   # stop following an event nobody read for this long
MAX_SCAN = 512  # more changes than this since an entry was kept: read it from the actor
KEEP = 8192     # changes kept; entries older than the oldest are read again

MISS = object()


class LineMirror:
    """The entries of one event this replica has read, and the changes since."""

    def __init__(self) -> None:
        self.count = -1          # the follower has seen every change up to this fact count
        self.feed = ""           # which actor's feed (a restarted actor starts a new one)
        self.rate: float | None = None
        self.answered = 0.0      # monotonic time of the actor's last answer to the follower
        self.read_at = time.monotonic()
        self.touched: set[str] = set()  # read here since the follower last told the actor
        self._from = 0           # the log holds every change after this count
        self._tags: list[int] = []
        self._log: list[tuple[int, str | None, int, int, int]] = []
        # user -> [count the view is exact at, view, lane, slot]
        self._kept: dict[str, list[Any]] = {}

    def fresh(self) -> bool:
        return time.monotonic() - self.answered < FRESH_S

    def update(self, feed: str, count: int, rate: float | None, changes: list | None) -> None:
        """What the actor answered the follower (`EventQueue.changes`)."""
        if changes is None or feed != self.feed:  # the actor cannot say what changed: start anew
            self.feed = feed
            self._kept.clear()
            self._tags.clear()
            self._log.clear()
            self._from = count
        elif changes:
            self._log.extend(tuple(c) for c in changes)
            self._tags.extend(c[0] for c in changes)
            if len(self._log) > KEEP:
                cut = len(self._log) - KEEP // 2
                self._from = self._tags[cut - 1]
                del self._log[:cut], self._tags[:cut]
        self.count = count
        self.rate = rate
        self.answered = time.monotonic()

    def keep(self, user: str, feed: str, count: int, view: dict[str, Any] | None, lane: int,
             slot: int) -> None:
        """An entry as the actor read it, exact at fact count `count` of `feed`."""
        if feed == self.feed and count >= self._from:
            self._kept[user] = [count, view, lane, slot]

    def read(self, user: str, durable: int) -> Any:
        """The user's entry now, or MISS when only the actor can say."""
        kept = self._kept.get(user)
        if kept is None:
            return MISS
        count, view, lane, slot = kept
        if count < self._from or max(count, self.count) < durable:
            return MISS  # a fact journaled since has not reached this mirror yet
        start = bisect.bisect_right(self._tags, count)
        if len(self._log) - start > MAX_SCAN:
            return MISS
        position = None if view is None else view["position"]
        log = self._log
        for i in range(start, len(log)):
            _, who, ln, sl, delta = log[i]
            if who == user:
                del self._kept[user]
                return MISS
            if delta and position is not None and (ln < lane or (ln == lane and sl < slot)):
                position += delta
        if view is None:
            return None
        if position != view["position"]:
            view = {**view, "position": position}
        if count < self.count:  # what was applied need not be applied again
            kept[0], kept[1] = self.count, view
        rate = self.rate
        eta = position / rate if position is not None and rate else None
        return {**view, "eta_seconds": eta}
