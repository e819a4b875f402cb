"""A replica's mirror of the line entries it has read: position reads without an actor call.

Under `ramp` an event's actor spent ~95 % of its time in Ray's per-call machinery and a
position read waited for a call behind the others. A replica now keeps each entry it read
with the fact count the view is exact at, and the entry's place (lane, slot). A follower
asks the actor what changed since the count it has seen (`actors.feed`), every `QUIET_S`,
or at most every `POLL_S` while a reader waits for it; one small call replaces hundreds of
reads. A kept entry is then answered here:

- a change of the entry's own user (joined again, left, offered, bought, expired…) drops
  it: the next read goes to the actor;
- an entry that started or stopped waiting ahead of it (an earlier slot of its lane, or
  any slot of a lane served before it) moves its position by one, so positions stay exact;
- the ETA divides the position by the outflow the actor reported with the changes.

Only while the mirror is complete: the line's journal writes how many facts are durable
(`keys.line_durable`) with every record, and a read answers from the mirror only when it
has seen at least that many (a write acknowledged to anyone, on any replica, is journaled
first, so a reader sees its own writes), and only while the actor answered the follower in
the last `FRESH_S`. A reader whose entry is kept but who is behind the journal waits for
the follower's next answer; any other read goes to the actor, as before.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Sequence
from typing import Any

POLL_S = 0.05   # the follower asks the actor at most this often, when a reader waits
QUIET_S = 0.25  # and this often when none does (each call costs the actor ~1 ms here)
FRESH_S = 0.75  # answer from the mirror only while the actor answered this recently
IDLE_S = 15.0   # stop following an event nobody read for this long
MAX_SCAN = 2048  # more moves than this since a waiting entry was kept: read it from the actor
KEEP = 16384    # moves kept; waiting entries kept before the oldest are read again

MISS = object()    # only the actor can say
BEHIND = object()  # the entry is kept, but a fact journaled since has not reached the mirror


class LineMirror:
    """The entries of one event this replica has read, and the changes since."""

    def __init__(self) -> None:
        self.count = -1          # the follower has seen every change up to this fact count
        self.feed = ""           # which actor's feed (a restarted actor starts a new one)
        self.rate: float | None = None
        self.answered = 0.0      # monotonic time of the actor's last answer to the follower
        self.read_at = time.monotonic()
        self.touched: set[str] = set()  # read here since the follower last told the actor
        self.waiting: list[asyncio.Future] = []  # readers waiting for the follower's next answer
        self.watching: list[asyncio.Future] = []  # the SSE hub, waiting for it without hurry
        self.listeners = 0       # streams listening here (the hub): the follower keeps on
        self.answers = 0         # the actor's answers to the follower so far
        self.task: asyncio.Task | None = None  # the follower (`serve.entries`)
        self.wanted = asyncio.Event()  # a reader waits: the follower asks as soon as it may
        self._anew = 0           # the mirror knows every change after this count
        self._from = 0           # the moves kept are every move after this count
        self._changed: dict[str, int] = {}  # user -> count after their entry's last change
        self._tags: list[int] = []  # of the moves, in order
        self._moves: list[tuple[int, int, int]] = []  # (lane, slot, ±1): entered or left waiting
        # user -> [count the view is exact at, view, lane, slot]
        self._kept: dict[str, list[Any]] = {}
        self._viewed: int | None = None  # the fact count of the last `views`

    def fresh(self) -> bool:
        return time.monotonic() - self.answered < FRESH_S

    async def next_answer(self) -> bool:
        """Wait for the answer to a follower's call made after now; False if it failed.

        During a burst of joins the journal runs a little ahead of the mirror; the readers
        wait for the follower (at most `POLL_S` plus a call) instead of each going to the
        actor, which under load is the busiest process of all."""
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.wanted.set()
        try:
            return await asyncio.wait_for(fut, FRESH_S)
        except TimeoutError:
            return False

    async def next_update(self, timeout: float) -> None:
        """Wait until the follower's call in flight, or its next, has ended (or `timeout`):
        the SSE hub, at the follower's own pace. `answers` says whether one was answered."""
        fut = asyncio.get_running_loop().create_future()
        self.watching.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)

    @staticmethod
    def wake(waiting: list[asyncio.Future], ok: bool) -> None:
        """Tell readers waiting for a follower's call how it went."""
        for fut in waiting:
            if not fut.done():
                fut.set_result(ok)

    def update(self, feed: str, count: int, rate: float | None, changes: list | None) -> None:
        """What the actor answered the follower (`EventQueue.changes`)."""
        if changes is None or feed != self.feed:  # the actor cannot say what changed: start anew
            self.feed = feed
            self._kept.clear()
            self._changed.clear()
            self._tags.clear()
            self._moves.clear()
            self._anew = self._from = count
        elif changes:
            changed, tags, moves = self._changed, self._tags, self._moves
            for tag, user, lane, slot, delta in changes:
                if user is not None:
                    changed[user] = tag
                else:
                    tags.append(tag)
                    moves.append((lane, slot, delta))
            if len(moves) > KEEP:
                cut = len(moves) - KEEP // 2
                self._from = tags[cut - 1]
                del moves[:cut], tags[:cut]
        self.count = count
        self.rate = rate
        self.answered = time.monotonic()
        self.answers += 1

    def keep(self, user: str, feed: str, count: int, view: dict[str, Any] | None, lane: int,
             slot: int) -> None:
        """An entry as the actor read it, exact at fact count `count` of `feed`."""
        kept = self._kept.get(user)
        if feed == self.feed and count >= self._anew and (kept is None or count >= kept[0]):
            self._kept[user] = [count, view, lane, slot]  # never an older read over a newer

    def holds(self, user: str) -> bool:
        """Whether the user's entry is kept and no change of its own has been seen since."""
        kept = self._kept.get(user)
        return kept is not None and self._changed.get(user, -1) <= kept[0]

    def views(self, users: Sequence[str]) -> list[Any]:
        """Each user's entry now, as `read` answers it but without the journal check (a
        stream is pushed what the actor said last), MISS where only the actor can say.

        The SSE hub asks this for all its listeners after each of the follower's answers:
        an entry kept at the last call's count moves by the moves since, found by one
        bisection in those moves sorted by place, so thousands of listeners cost one pass
        over the moves, not one each."""
        since, self._viewed = self._viewed, self.count
        kept_all, changed = self._kept, self._changed
        places: list[tuple[int, int]] = []
        sums = [0]
        batched = since is not None and since >= self._from  # the moves since are all kept
        if batched:
            recent = sorted(self._moves[bisect.bisect_right(self._tags, since):])
            places = [(ln, sl) for ln, sl, _ in recent]
            for _, _, delta in recent:
                sums.append(sums[-1] + delta)
        now_count = self.count
        out: list[Any] = []
        for user in users:
            kept = kept_all.get(user)
            if kept is None or changed.get(user, -1) > kept[0]:
                out.append(self.read(user, 0))  # MISS, and forgotten if its own entry changed
                continue
            count, view, lane, slot = kept
            if view is None or view["position"] is None:  # only its own change changes it
                out.append(view)
                continue
            if count >= now_count:  # nothing since
                position = view["position"]
                out.append(self._timed(view, position))
                continue
            if count != since or not batched:
                out.append(self.read(user, 0))  # kept at another count: its own scan
                continue
            position = view["position"] + sums[bisect.bisect_left(places, (lane, slot))]
            if position != view["position"]:
                view = {**view, "position": position}
            kept[0], kept[1] = now_count, view
            out.append(self._timed(view, position))
        return out

    def read(self, user: str, durable: int) -> Any:
        """The user's entry now; MISS when only the actor can say, BEHIND when the follower's
        next answer can."""
        kept = self._kept.get(user)
        if kept is None:
            return MISS
        count, view, lane, slot = kept
        if self._changed.get(user, -1) > count:  # joined again, left, offered, bought…
            del self._kept[user]
            return MISS
        if max(count, self.count) < durable:
            return BEHIND
        if view is None:
            return None
        position = view["position"]
        if position is None:  # not waiting: only the entry's own changes change it
            return view
        if count < self._from:
            return MISS
        start = bisect.bisect_right(self._tags, count)
        moves = self._moves
        if len(moves) - start > MAX_SCAN:
            return MISS
        for i in range(start, len(moves)):
            ln, sl, delta = moves[i]
            if ln < lane or (ln == lane and sl < slot):
                position += delta
        if position != view["position"]:
            view = {**view, "position": position}
        if count < self.count:  # what was applied need not be applied again
            kept[0], kept[1] = self.count, view
        return self._timed(view, position)

    def _timed(self, view: dict[str, Any], position: int) -> dict[str, Any]:
        """`view` with its ETA: the position over the outflow the actor reported last."""
        rate = self.rate
        return {**view, "eta_seconds": position / rate if rate else None}
