"""The waiting line of one event, pure: no Ray, no Redis, no clock (`now` is a parameter).

Event-sourced. A command validates, decides, and returns the *facts* it produced, each
already applied through the same handler that `apply` uses, so replaying the journal
rebuilds the line exactly without re-running any policy (randomness, abandonment and
expiry decisions are all recorded in facts). A command that raises has changed nothing.

Storage is columnar, indexed by entry id (order of arrival): one `array` per field plus
`user -> latest entry id`. That keeps a million entries to ~100 bytes each, where one
Python object per entry would cost several times more.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
import sys
from array import array
from bisect import bisect_left
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from actors.fenwick import Marks
from eventpulse.errors import (
    AlreadyPurchased, Conflict, DecodeError, EntryNotFound, EventPulseError, InvalidInput,
    NoOffer, OfferExpired, QueueClosed, SoldOut,
)

Fact = dict[str, Any]

STATUSES = ("waiting", "offered", "purchasing", "purchased", "expired", "left", "released",
            "abandoned", "sold_out", "cancelled")
WAITING, OFFERED, PURCHASING, PURCHASED, EXPIRED, LEFT, RELEASED, ABANDONED, SOLD_OUT, CANCELLED = range(10)
# codes <= PURCHASING are live: at most one live entry per user

RATE_WINDOW_S = 60.0  # offers_per_minute counts grants in this trailing window
OUTFLOW_WINDOW_S = 300.0  # ETA: measured over 5 minutes, long enough to smooth bursts
MIN_OUTFLOW_SPAN_S = 60.0  # ... but never over less than a minute (a burst is not a rate)
SNAPSHOT_FORMAT = 1
MAX_USER_LEN = 256
TUNABLE = ("paused", "offers_per_minute", "max_live_offers", "offer_seconds", "abandon_after_s")


@dataclass
class LineConfig:
    capacity: dict[str, int]  # ticket type -> quantity; the first type is the default
    max_per_user: int = 4
    offer_seconds: float = 1800.0
    offers_per_minute: int | None = None  # None: unlimited
    max_live_offers: int | None = None  # None: unlimited
    paused: bool = False
    abandon_after_s: float | None = 300.0  # None: never abandon
    sale_opens_at: float | None = None  # None: open now
    lanes: int = 2  # lane 0 is served first; the last lane is the general one


@dataclass(slots=True)
class EntryView:
    user: str
    status: str
    position: int | None  # exact rank among waiting entries, None unless waiting and open
    eta_seconds: float | None
    quantity: int
    ticket_type: str
    lane: int
    offer_quantity: int | None
    offer_expires_at: float | None
    joined_at: float


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return type(v) in (int, float) and v == v and v not in (float("inf"), float("-inf"))


def _check_tunable(name: str, value: Any) -> Any:
    """Validate one runtime-tunable setting; returns its normalized value."""
    if name == "paused":
        if type(value) is not bool:
            raise InvalidInput("paused must be true or false")
        return value
    if name in ("offers_per_minute", "max_live_offers"):
        if value is not None and not (_is_int(value) and value >= 1):
            raise InvalidInput(f"{name} must be a positive integer or null")
        return value
    if name == "offer_seconds":
        if not (_is_num(value) and value > 0):
            raise InvalidInput("offer_seconds must be a positive number")
        return float(value)
    if name == "abandon_after_s":
        if value is not None and not (_is_num(value) and value > 0):
            raise InvalidInput("abandon_after_s must be a positive number or null")
        return None if value is None else float(value)
    raise InvalidInput(f"unknown setting {name!r}; tunable: {', '.join(TUNABLE)}")


def _check_config(c: LineConfig) -> None:
    if not c.capacity or not isinstance(c.capacity, dict) or len(c.capacity) > 127:
        raise InvalidInput("capacity must name 1..127 ticket types")
    for name, qty in c.capacity.items():
        if not isinstance(name, str) or not name or not (_is_int(qty) and qty >= 0):
            raise InvalidInput(f"ticket type {name!r} needs a name and a quantity >= 0")
    if not (_is_int(c.max_per_user) and 1 <= c.max_per_user <= 127):
        raise InvalidInput("max_per_user must be 1..127")
    if not (_is_int(c.lanes) and 1 <= c.lanes <= 16):
        raise InvalidInput("lanes must be 1..16")
    if c.sale_opens_at is not None and not _is_num(c.sale_opens_at):
        raise InvalidInput("sale_opens_at must be a number or null")
    for name in TUNABLE:
        setattr(c, name, _check_tunable(name, getattr(c, name)))


class WaitingLine:
    """One event's line. Commands return the facts they applied; `apply` replays them."""

    def __init__(self, config: LineConfig) -> None:
        config = LineConfig(**{**asdict(config), "capacity": dict(config.capacity)})
        _check_config(config)
        self.config = config
        self._types = list(config.capacity)
        self._type_ix = {t: i for i, t in enumerate(self._types)}
        self._cap = [config.capacity[t] for t in self._types]
        self._held = [0] * len(self._types)
        self._sold = [0] * len(self._types)
        # columns, by entry id
        self._users: list[str] = []
        self._index: dict[str, int] = {}  # user -> latest entry id
        self._st: array[int] = array("b")
        self._lane: array[int] = array("b")
        self._qty: array[int] = array("b")
        self._tt: array[int] = array("b")
        self._seq: array[int] = array("i")  # slot in its lane; -1 while in the pre-queue
        self._joined: array[float] = array("d")
        self._seen: array[float] = array("d")
        self._oq: array[int] = array("b")  # offered (then bought) quantity
        self._ox: array[float] = array("d")  # offer expiry
        # per lane: entry ids by slot, slots no longer waiting, first maybe-waiting slot
        self._order: list[array[int]] = [array("i") for _ in range(config.lanes)]
        self._gone = [Marks() for _ in range(config.lanes)]
        self._head = [0] * config.lanes
        self._lane_waiting = [0] * config.lanes
        self._pre: array[int] = array("i")
        self._pre_waiting = 0
        self._buying: dict[int, int] = {}  # entry id -> quantity being bought
        self._live_offers = 0  # offered + purchasing
        self._expiry: list[tuple[float, int]] = []  # heap; stale items skipped lazily
        self._grants: list[float] = []  # offer times, non-decreasing, >= OUTFLOW_WINDOW_S old trimmed
        self._grants_lo = 0
        self._first_grant: float | None = None
        self._opened = config.sale_opens_at is None
        self._opened_at: float | None = None
        self._seed: int | None = None
        self._closed = False
        self.version = 0
        # (lane, slot, ±1) for each entry that started or stopped waiting in a lane: what
        # moved other entries' positions. The actor drains it into its change feed.
        self.moves: list[tuple[int, int, int]] = []
        self._n = dict.fromkeys(("joins", "offers", "expired", "abandoned", "left", "released",
                                 "sold_out", "purchased", "cancelled"), 0)
        self._handlers: dict[str, Callable[[Fact], None]] = {
            "j": self._on_joined, "lv": self._on_left, "o": self._on_offered,
            "x": self._on_expired, "r": self._on_released, "a": self._on_abandoned,
            "so": self._on_sold_out, "p": self._on_purchasing, "b": self._on_purchased,
            "pf": self._on_purchase_failed, "c": self._on_configured, "op": self._on_opened,
            "cl": self._on_closed,
        }

    # ---------------------------------------------------------------- replay
    def apply(self, fact: Fact) -> None:
        """Apply one journaled fact. An unknown or malformed fact raises DecodeError."""
        kind = fact.get("k") if isinstance(fact, dict) else None
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise DecodeError(f"unknown fact kind {kind!r}")
        try:
            handler(fact)
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, EventPulseError) as e:
            raise DecodeError(f"malformed {kind!r} fact: {e!r}") from e

    def _emit(self, fact: Fact, facts: list[Fact]) -> None:
        self._handlers[fact["k"]](fact)
        facts.append(fact)

    def _entry(self, fact: Fact, *allowed: int) -> int:
        user = fact["u"]
        eid = self._index.get(user) if type(user) is str else None
        if eid is None or self._st[eid] not in allowed:
            raise DecodeError(f"{fact['k']!r} fact does not fit the entry of user {user!r}")
        return eid

    def _stop_waiting(self, eid: int, status: int) -> None:
        """Move a live entry to `status`, releasing whatever it held or occupied."""
        old = self._st[eid]
        if old == WAITING:
            slot, lane = self._seq[eid], self._lane[eid]
            if slot < 0:
                self._pre_waiting -= 1
            else:
                self._gone[lane].mark(slot)
                self._lane_waiting[lane] -= 1
                self.moves.append((lane, slot, -1))
        elif old in (OFFERED, PURCHASING):
            self._held[self._tt[eid]] -= self._oq[eid]
            self._live_offers -= 1
            self._buying.pop(eid, None)
        self._st[eid] = status

    def _on_joined(self, f: Fact) -> None:
        user, qty, tname, lane, slot, at = f["u"], f["q"], f["t"], f["l"], f["s"], float(f["at"])
        t = self._type_ix[tname]
        if type(user) is not str or not (_is_int(qty) and 1 <= qty <= self.config.max_per_user):
            raise DecodeError(f"joined fact with bad user or quantity: {f!r}")
        if not (_is_int(lane) and 0 <= lane < self.config.lanes) or self._closed:
            raise DecodeError(f"joined fact with bad lane or on a closed line: {f!r}")
        old = self._index.get(user)
        if old is not None and self._st[old] <= PURCHASING:
            raise DecodeError(f"joined fact for user {user!r} who is already in line")
        if slot != (len(self._order[lane]) if self._opened else None):
            raise DecodeError(f"joined fact for user {user!r} has slot {slot!r}, expected another")
        self._add(user, qty, t, lane, at)

    def _add(self, user: str, qty: int, t: int, lane: int, at: float) -> int:
        """Append a waiting entry (the command has validated it); returns its id."""
        eid = len(self._users)
        self._users.append(user)
        self._index[user] = eid
        self._st.append(WAITING)
        self._lane.append(lane)
        self._qty.append(qty)
        self._tt.append(t)
        self._joined.append(at)
        self._seen.append(at)
        self._oq.append(0)
        self._ox.append(0.0)
        if self._opened:
            order = self._order[lane]
            self._seq.append(len(order))
            order.append(eid)
            self._gone[lane].ensure(len(order))
            self._lane_waiting[lane] += 1
            self.moves.append((lane, len(order) - 1, 1))
        else:
            self._seq.append(-1)
            self._pre.append(eid)
            self._pre_waiting += 1
        self._n["joins"] += 1
        self.version += 1
        return eid

    def _on_left(self, f: Fact) -> None:
        self._stop_waiting(self._entry(f, WAITING, OFFERED), LEFT)
        self._n["left"] += 1
        self.version += 1

    def _on_offered(self, f: Fact) -> None:
        eid = self._entry(f, WAITING)
        qty, expires, at = f["q"], float(f["x"]), float(f["at"])
        t = self._tt[eid]
        if self._seq[eid] < 0 or not (_is_int(qty) and 1 <= qty <= self._qty[eid]):
            raise DecodeError(f"offered fact does not fit the entry: {f!r}")
        if qty > self._cap[t] - self._sold[t] - self._held[t]:
            raise DecodeError(f"offered fact would oversell {self._types[t]!r}: {f!r}")
        self._stop_waiting(eid, OFFERED)
        self._oq[eid], self._ox[eid] = qty, expires
        self._held[t] += qty
        self._live_offers += 1
        heapq.heappush(self._expiry, (expires, eid))
        grants = self._grants
        if grants and at < grants[-1]:
            at = grants[-1]  # a clock step back must not unsort the window
        grants.append(at)
        if self._first_grant is None:
            self._first_grant = at
        lo = self._grants_lo = bisect.bisect_right(grants, at - OUTFLOW_WINDOW_S, self._grants_lo)
        if lo > 4096 and lo * 2 > len(grants):
            del grants[:lo]
            self._grants_lo = 0
        self._n["offers"] += 1
        self.version += 1

    def _ended(self, f: Fact, status: int, counter: str, *allowed: int) -> None:
        self._stop_waiting(self._entry(f, *allowed), status)
        self._n[counter] += 1
        self.version += 1

    def _on_expired(self, f: Fact) -> None:
        self._ended(f, EXPIRED, "expired", OFFERED)

    def _on_released(self, f: Fact) -> None:
        self._ended(f, RELEASED, "released", OFFERED, PURCHASING)

    def _on_abandoned(self, f: Fact) -> None:
        self._ended(f, ABANDONED, "abandoned", WAITING)

    def _on_sold_out(self, f: Fact) -> None:
        self._ended(f, SOLD_OUT, "sold_out", WAITING)

    def _on_purchasing(self, f: Fact) -> None:
        eid = self._entry(f, OFFERED)
        qty = f["q"]
        if not (_is_int(qty) and 1 <= qty <= self._oq[eid]):
            raise DecodeError(f"purchasing fact with a quantity beyond the offer: {f!r}")
        self._st[eid] = PURCHASING
        self._buying[eid] = qty
        self.version += 1

    def _on_purchased(self, f: Fact) -> None:
        eid = self._entry(f, PURCHASING)
        qty, t = self._buying[eid], self._tt[eid]
        self._stop_waiting(eid, PURCHASED)
        self._sold[t] += qty
        self._oq[eid] = qty
        self._n["purchased"] += 1
        self.version += 1

    def _on_purchase_failed(self, f: Fact) -> None:
        eid = self._entry(f, PURCHASING)
        self._st[eid] = OFFERED
        del self._buying[eid]
        heapq.heappush(self._expiry, (self._ox[eid], eid))
        self.version += 1

    def _on_configured(self, f: Fact) -> None:
        changes = f["ch"]
        if not isinstance(changes, dict):
            raise DecodeError(f"configured fact without changes: {f!r}")
        checked = {name: _check_tunable(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self.config, name, value)
        self.version += 1

    def _on_opened(self, f: Fact) -> None:
        seed, at = f["seed"], float(f["at"])
        if self._opened or self._closed or not _is_int(seed):
            raise DecodeError(f"opened fact on a line that cannot open: {f!r}")
        st = self._st
        drawn = [e for e in self._pre if st[e] == WAITING]
        random.Random(seed).shuffle(drawn)
        for eid in drawn:
            lane = self._lane[eid]
            order = self._order[lane]
            self._seq[eid] = len(order)
            order.append(eid)
            self._gone[lane].ensure(len(order))
            self._lane_waiting[lane] += 1
        self._pre = array("i")
        self._pre_waiting = 0
        self._opened, self._opened_at, self._seed = True, at, seed
        self.version += 1

    def _on_closed(self, f: Fact) -> None:
        float(f["at"])
        if self._closed:
            raise DecodeError("closed fact on a closed line")
        st = self._st
        for eid, status in enumerate(st):
            if status <= PURCHASING:
                st[eid] = CANCELLED
                self._n["cancelled"] += 1
        # Nobody waits any more and no one can join: the lane trees are left as they are.
        self._lane_waiting = [0] * self.config.lanes
        self._pre_waiting = 0
        self._held = [0] * len(self._types)
        self._buying.clear()
        self._expiry.clear()
        self._live_offers = 0
        self._closed = True
        self.version += 1

    # ---------------------------------------------------------------- commands
    def join(self, user: str, quantity: int, now: float, ticket_type: str | None = None,
             lane: int | None = None) -> tuple[EntryView, list[Fact]]:
        """Enter the line (idempotent: a live entry is returned as is, with no facts)."""
        facts: list[Fact] = []
        view = self._join(user, quantity, ticket_type, lane, now, facts, self._outflow(now))
        return view, facts

    def join_many(self, items: Sequence[Sequence[Any]], now: float
                  ) -> tuple[list[EntryView | EventPulseError], list[Fact]]:
        """Join (user, quantity[, ticket_type[, lane]]) items; a bad item gets its error in its slot."""
        facts: list[Fact] = []
        out: list[EntryView | EventPulseError] = []
        rate, join = self._outflow(now), self._join
        for item in items:
            try:
                if type(item) is tuple and len(item) == 4:
                    out.append(join(item[0], item[1], item[2], item[3], now, facts, rate))
                elif isinstance(item, (tuple, list)) and 2 <= len(item) <= 4:
                    u, q, t, lane = (*item, None, None)[:4]
                    out.append(join(u, q, t, lane, now, facts, rate))
                else:
                    raise InvalidInput("a join is (user, quantity, ticket_type, lane)")
            except EventPulseError as e:
                out.append(e)
        return out, facts

    def _join(self, user: Any, quantity: Any, ticket_type: Any, lane: Any, now: float,
              facts: list[Fact], rate: float | None) -> EntryView:
        cfg = self.config
        if type(user) is not str or not 0 < len(user) <= MAX_USER_LEN:
            raise InvalidInput(f"user must be a string of 1..{MAX_USER_LEN} characters")
        if type(quantity) is not int or not 1 <= quantity <= cfg.max_per_user:
            raise InvalidInput(f"quantity must be an integer 1..{cfg.max_per_user}")
        if ticket_type is None:
            ticket_type = self._types[0]
        t = self._type_ix.get(ticket_type) if type(ticket_type) is str else None
        if t is None:
            raise InvalidInput(f"unknown ticket type {ticket_type!r}")
        if lane is None:
            lane = cfg.lanes - 1
        elif type(lane) is not int or not 0 <= lane < cfg.lanes:
            raise InvalidInput(f"lane must be 0..{cfg.lanes - 1}")
        if self._closed:
            raise QueueClosed("this event's line is closed")
        old = self._index.get(user)
        if old is not None:
            if self._st[old] <= PURCHASING:
                return self._view(old, now, rate)
            if self._st[old] == PURCHASED:
                raise AlreadyPurchased("you already bought tickets for this event")
        if self._sold[t] >= self._cap[t]:
            raise SoldOut(f"{ticket_type!r} is sold out")
        opened = self._opened
        facts.append({"k": "j", "u": user, "q": quantity, "t": ticket_type, "l": lane,
                      "s": len(self._order[lane]) if opened else None, "at": now})
        self._add(user, quantity, t, lane, now)
        position = None
        if opened:  # the newcomer is last in its lane
            waiting = self._lane_waiting
            position = waiting[0] if lane == 0 else sum(waiting[:lane + 1])
        return EntryView(user, "waiting", position, position / rate if position and rate else None,
                         quantity, ticket_type, lane, None, None, now)

    def _live(self, user: str) -> int:
        eid = self._index.get(user)
        if eid is None or self._st[eid] > PURCHASING:
            raise EntryNotFound("you are not in this line")
        return eid

    def leave(self, user: str, now: float) -> list[Fact]:
        """Leave the line; a held offer goes to the next entry at once."""
        eid = self._live(user)
        if self._st[eid] == PURCHASING:
            raise Conflict("a purchase is being committed; it cannot be abandoned now")
        held = self._st[eid] == OFFERED
        facts: list[Fact] = []
        self._emit({"k": "lv", "u": user, "at": now}, facts)
        if held:
            self._offer_step(now, facts)
        return facts

    def release(self, user: str, now: float) -> list[Fact]:
        """Decline an offer; its seats go to the next entry at once."""
        eid = self._index.get(user)
        if eid is None or self._st[eid] != OFFERED:
            raise NoOffer("you hold no offer")
        facts: list[Fact] = []
        self._emit({"k": "r", "u": user, "at": now}, facts)
        self._offer_step(now, facts)
        return facts

    def touch(self, user: str, now: float) -> None:
        """Record that the user is still here (not journaled: it only informs later decisions)."""
        eid = self._index.get(user)
        if eid is not None and self._st[eid] <= PURCHASING and now > self._seen[eid]:
            self._seen[eid] = now

    def tick(self, now: float, seed: int | None = None) -> list[Fact]:
        """Open the sale if due, expire due offers, grant offers. `seed` draws the pre-queue order."""
        facts: list[Fact] = []
        at = self.config.sale_opens_at
        if not self._opened and not self._closed and at is not None and now >= at:
            if seed is None:
                seed = self._derived_seed()
            self._emit({"k": "op", "seed": seed, "at": now}, facts)
        heap, st, ox = self._expiry, self._st, self._ox
        while heap and heap[0][0] <= now:
            expires, eid = heapq.heappop(heap)
            if st[eid] == OFFERED and ox[eid] == expires:
                self._emit({"k": "x", "u": self._users[eid], "at": now}, facts)
        self._offer_step(now, facts)
        return facts

    def _derived_seed(self) -> int:
        """Fallback seed, reproducible from the line itself; the actor passes a random one."""
        h = hashlib.sha256(repr(self.config.sale_opens_at).encode())
        for eid in self._pre:
            h.update(self._users[eid].encode() + b"\0")
        return int.from_bytes(h.digest()[:8], "big") >> 1

    def _offer_step(self, now: float, facts: list[Fact]) -> None:
        cfg = self.config
        if cfg.paused or self._closed or not self._opened:
            return
        max_live, per_minute = cfg.max_live_offers, cfg.offers_per_minute
        recent = self._grants_since(now - RATE_WINDOW_S) if per_minute is not None else 0
        cutoff = None if cfg.abandon_after_s is None else now - cfg.abandon_after_s
        users, tt, cap, sold, held = self._users, self._tt, self._cap, self._sold, self._held
        for lane in range(cfg.lanes):
            while True:
                if max_live is not None and self._live_offers >= max_live:
                    return
                if per_minute is not None and recent >= per_minute:
                    return
                eid = self._lane_head(lane)
                if eid < 0:
                    break
                if cutoff is not None and self._seen[eid] < cutoff:
                    self._emit({"k": "a", "u": users[eid], "at": now}, facts)
                    continue
                t = tt[eid]
                free = cap[t] - sold[t] - held[t]
                if free > 0:
                    self._emit({"k": "o", "u": users[eid], "q": min(self._qty[eid], free),
                                "x": now + cfg.offer_seconds, "at": now}, facts)
                    recent += 1
                elif held[t] > 0:
                    break  # strict FIFO: this lane waits for held seats to come back
                else:
                    self._emit({"k": "so", "u": users[eid], "at": now}, facts)

    def _lane_head(self, lane: int) -> int:
        order, st, h = self._order[lane], self._st, self._head[lane]
        n = len(order)
        while h < n and st[order[h]] != WAITING:
            h += 1
        self._head[lane] = h
        return order[h] if h < n else -1

    def begin_purchase(self, user: str, quantity: int, now: float) -> list[Fact]:
        """Lock an offer while its purchase commits: it cannot expire meanwhile.

        Beginning again with the same quantity is a no-op, so a retried call is safe. An
        offer past its expiry raises OfferExpired and is expired by the next `tick`.
        """
        eid = self._index.get(user)
        status = -1 if eid is None else self._st[eid]
        if eid is not None and status == PURCHASING and self._buying[eid] == quantity:
            return []
        if status == PURCHASED:
            raise AlreadyPurchased("you already bought tickets for this event")
        if status == PURCHASING:
            raise Conflict("a purchase with another quantity is being committed")
        if eid is None or status != OFFERED:
            raise NoOffer("you hold no offer")
        if self._ox[eid] <= now:
            raise OfferExpired("your offer has expired")
        if not (_is_int(quantity) and 1 <= quantity <= self._oq[eid]):
            raise InvalidInput(f"quantity must be 1..{self._oq[eid]} (your offer)")
        facts: list[Fact] = []
        self._emit({"k": "p", "u": user, "q": quantity, "at": now}, facts)
        return facts

    def begin_purchase_many(self, items: Sequence[Sequence[Any]], now: float
                            ) -> tuple[list[EventPulseError | None], list[Fact]]:
        """Per (user, quantity): None or the error; offers found past expiry are expired here."""
        facts: list[Fact] = []
        results: list[EventPulseError | None] = []
        freed = False
        for item in items:
            try:
                user, quantity = item
                facts += self.begin_purchase(user, quantity, now)
                results.append(None)
            except EventPulseError as e:
                if isinstance(e, OfferExpired):
                    self._emit({"k": "x", "u": user, "at": now}, facts)
                    freed = True
                results.append(e)
            except (TypeError, ValueError):
                results.append(InvalidInput("a purchase is (user, quantity)"))
        if freed:
            self._offer_step(now, facts)
        return results, facts

    def complete_purchase(self, user: str, now: float) -> list[Fact]:
        """The purchase committed: the offer is consumed, its unbought seats move on."""
        facts: list[Fact] = []
        self._finish(user, "committed", now, facts)
        self._offer_step(now, facts)
        return facts

    def fail_purchase(self, user: str, now: float, declined: bool = False) -> list[Fact]:
        """The commit failed: back to the offer (or expired if past it); declined releases it."""
        facts: list[Fact] = []
        self._finish(user, "declined" if declined else "failed", now, facts)
        self._offer_step(now, facts)
        return facts

    def finish_purchase_many(self, items: Sequence[Sequence[Any]], now: float
                             ) -> tuple[list[EventPulseError | None], list[Fact]]:
        """Per (user, outcome) with outcome committed/declined/failed: None or the error."""
        facts: list[Fact] = []
        results: list[EventPulseError | None] = []
        for item in items:
            try:
                user, outcome = item
                self._finish(user, outcome, now, facts)
                results.append(None)
            except EventPulseError as e:
                results.append(e)
            except (TypeError, ValueError):
                results.append(InvalidInput("a settlement is (user, outcome)"))
        self._offer_step(now, facts)
        return results, facts

    def _finish(self, user: str, outcome: str, now: float, facts: list[Fact]) -> None:
        if outcome not in ("committed", "declined", "failed"):
            raise InvalidInput(f"unknown purchase outcome {outcome!r}")
        eid = self._index.get(user)
        if eid is not None and self._st[eid] == PURCHASED:
            raise AlreadyPurchased("this purchase is already settled")
        if eid is None or self._st[eid] != PURCHASING:
            raise NoOffer("no purchase is being committed for this user")
        if outcome == "committed":
            self._emit({"k": "b", "u": user, "at": now}, facts)
        elif outcome == "declined":
            self._emit({"k": "r", "u": user, "at": now}, facts)
        else:
            self._emit({"k": "pf", "u": user, "at": now}, facts)
            if self._ox[eid] <= now:
                self._emit({"k": "x", "u": user, "at": now}, facts)

    def configure(self, now: float, **changes: Any) -> list[Fact]:
        """Change tunable settings (paused, offers_per_minute, …); call `tick` afterwards."""
        checked = {name: _check_tunable(name, value) for name, value in changes.items()}
        diff = {k: v for k, v in checked.items() if getattr(self.config, k) != v}
        if not diff:
            return []
        facts: list[Fact] = []
        self._emit({"k": "c", "ch": diff, "at": now}, facts)
        return facts

    def close(self, now: float) -> list[Fact]:
        """Cancel the event: every live entry is cancelled and later joins are refused."""
        if self._closed:
            return []
        facts: list[Fact] = []
        self._emit({"k": "cl", "at": now}, facts)
        return facts

    # ---------------------------------------------------------------- queries
    def position(self, user: str) -> int | None:
        """Exact 1-based rank among all waiting entries, higher-priority lanes first; O(log n)."""
        eid = self._index.get(user)
        return None if eid is None else self._position(eid)

    def _position(self, eid: int) -> int | None:
        if self._st[eid] != WAITING:
            return None
        slot = self._seq[eid]
        if slot < 0:
            return None
        lane = self._lane[eid]
        ahead = 0
        if lane:
            waiting = self._lane_waiting
            ahead = waiting[0] if lane == 1 else sum(waiting[:lane])
        gone = self._gone[lane]
        end = slot + 1  # inlined Marks.fast_count: this is the hot read
        if end > gone.prefix:
            end = gone.prefix + bisect_left(gone.scattered, end)
        return ahead + slot + 1 - end

    def place(self, user: str) -> tuple[int, int] | None:
        """The (lane, slot) of the user's latest entry: entries earlier in that order are ahead
        of it while both wait (slot -1: in the pre-queue, no place yet)."""
        eid = self._index.get(user)
        return None if eid is None else (self._lane[eid], self._seq[eid])

    def outflow(self, now: float) -> float | None:
        """Offers granted per second lately (what the ETA divides by)."""
        return self._outflow(now)

    def view(self, user: str, now: float) -> EntryView | None:
        eid = self._index.get(user)
        return None if eid is None else self._view(eid, now, self._outflow(now))

    def view_many(self, users: Sequence[str], now: float) -> list[EntryView | None]:
        rate, index = self._outflow(now), self._index
        out: list[EntryView | None] = []
        for user in users:
            eid = index.get(user)
            out.append(None if eid is None else self._view(eid, now, rate))
        return out

    def _view(self, eid: int, now: float, rate: float | None) -> EntryView:
        status = self._st[eid]
        user = self._users[eid]
        position = self._position(eid) if status == WAITING else None
        eta = position / rate if position is not None and rate else None
        offered = status in (OFFERED, PURCHASING)
        oq = self._oq[eid] if offered or status == PURCHASED else None
        return EntryView(user, STATUSES[status], position, eta, self._qty[eid],
                         self._types[self._tt[eid]], self._lane[eid], oq,
                         self._ox[eid] if offered else None, self._joined[eid])

    def _grants_since(self, since: float) -> int:
        return len(self._grants) - bisect.bisect_right(self._grants, since, self._grants_lo)

    def _outflow(self, now: float) -> float | None:
        """Offers granted per second over the trailing window; None before the first one."""
        if self._first_grant is None:
            return None
        count = self._grants_since(now - OUTFLOW_WINDOW_S)
        if not count:
            return None
        span = min(OUTFLOW_WINDOW_S, max(MIN_OUTFLOW_SPAN_S, now - self._first_grant))
        return count / span

    def availability(self) -> dict[str, Any]:
        total, sold, held = sum(self._cap), sum(self._sold), sum(self._held)
        return {"total": total, "sold": sold, "held": held, "remaining": total - sold - held,
                "sold_out": sold >= total,
                "by_type": {t: {"total": self._cap[i], "sold": self._sold[i], "held": self._held[i],
                                "remaining": self._cap[i] - self._sold[i] - self._held[i]}
                            for i, t in enumerate(self._types)}}

    def stats(self, now: float) -> dict[str, Any]:
        cfg, avail = self.config, self.availability()
        rate, waiting = self._outflow(now), sum(self._lane_waiting)
        return {
            "waiting": waiting, "prequeue": self._pre_waiting,
            "waiting_by_lane": list(self._lane_waiting),
            "live_offers": self._live_offers, "purchasing": len(self._buying),
            "capacity": dict(zip(self._types, self._cap)),
            "held": dict(zip(self._types, self._held)), "sold": dict(zip(self._types, self._sold)),
            "remaining": avail["remaining"], "sold_out": avail["sold_out"],
            "offers_last_minute": self._grants_since(now - RATE_WINDOW_S),
            "outflow_per_minute": None if rate is None else rate * 60,
            "tail_eta_seconds": waiting / rate if rate and waiting else None,
            **{f"{name}_total": n for name, n in self._n.items()},
            "paused": cfg.paused, "closed": self._closed, "opened": self._opened,
            "opened_at": self._opened_at, "seed": self._seed, "version": self.version,
            "offers_per_minute": cfg.offers_per_minute, "max_live_offers": cfg.max_live_offers,
            "offer_seconds": cfg.offer_seconds, "abandon_after_s": cfg.abandon_after_s,
            "sale_opens_at": cfg.sale_opens_at,
        }

    def next_deadline(self, now: float) -> float | None:
        """The earliest instant at which `tick` would act (expiry, opening, rate window)."""
        if self._closed:
            return None
        due: list[float] = []
        if not self._opened and self.config.sale_opens_at is not None:
            due.append(self.config.sale_opens_at)
        heap, st, ox = self._expiry, self._st, self._ox
        while heap and not (st[heap[0][1]] == OFFERED and ox[heap[0][1]] == heap[0][0]):
            heapq.heappop(heap)  # stale: the offer ended otherwise
        if heap:
            due.append(heap[0][0])
        cfg = self.config
        if not self._opened or cfg.paused or not sum(self._lane_waiting):
            return min(due) if due else None
        if cfg.max_live_offers is not None and self._live_offers >= cfg.max_live_offers:
            return min(due) if due else None  # only an expiry or a settlement frees a slot
        per_minute = cfg.offers_per_minute
        if per_minute is not None and self._grants_since(now - RATE_WINDOW_S) >= per_minute:
            if any(c - s - h > 0 for c, s, h in zip(self._cap, self._sold, self._held)):
                due.append(self._grants[len(self._grants) - per_minute] + RATE_WINDOW_S)
        elif cfg.abandon_after_s is not None:
            # every lane head is waiting for held seats: one may be skipped as abandoned
            heads = [self._lane_head(lane) for lane in range(cfg.lanes)]
            due.extend(self._seen[h] + cfg.abandon_after_s for h in heads if h >= 0)
        return min(due) if due else None

    # ---------------------------------------------------------------- snapshot
    _COLUMNS = ("_st", "_lane", "_qty", "_tt", "_seq", "_joined", "_seen", "_oq", "_ox")

    def to_snapshot(self) -> dict[str, Any]:
        """The whole line as msgpack-able primitives (columns as native-endian bytes)."""
        for lane in range(self.config.lanes):
            self._lane_head(lane)  # normalize the lazy heads so equal lines snapshot equally
        cfg = asdict(self.config)
        cfg["capacity"] = [[t, q] for t, q in self.config.capacity.items()]
        return {
            "v": SNAPSHOT_FORMAT, "bo": sys.byteorder, "cfg": cfg, "users": list(self._users),
            "cols": {name[1:]: getattr(self, name).tobytes() for name in self._COLUMNS},
            "lanes": [[self._order[i].tobytes(), self._gone[i].tree.tobytes(), self._head[i],
                       self._lane_waiting[i]] for i in range(self.config.lanes)],
            "pre": self._pre.tobytes(), "pre_n": self._pre_waiting,
            "buying": [[eid, q] for eid, q in sorted(self._buying.items())],
            "sold": list(self._sold), "grants": self._grants[self._grants_lo:],
            "first_grant": self._first_grant, "opened": self._opened, "opened_at": self._opened_at,
            "seed": self._seed, "closed": self._closed, "version": self.version, "n": dict(self._n),
        }

    @classmethod
    def from_snapshot(cls, d: dict[str, Any]) -> WaitingLine:
        """Rebuild a line from `to_snapshot`; anything inconsistent raises DecodeError."""
        if not isinstance(d, dict) or d.get("v") != SNAPSHOT_FORMAT:
            raise DecodeError(f"unknown line snapshot format {d.get('v') if isinstance(d, dict) else d!r}")
        try:
            return cls._restore(d)
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
                EventPulseError) as e:
            raise DecodeError(f"line snapshot is malformed: {e!r}") from e

    @classmethod
    def _restore(cls, d: dict[str, Any]) -> WaitingLine:
        cfg = dict(d["cfg"])
        cfg["capacity"] = {t: q for t, q in cfg["capacity"]}
        line = cls(LineConfig(**cfg))
        swap = d["bo"] != sys.byteorder

        def column(typecode: str, blob: bytes) -> array[Any]:
            a: array[Any] = array(typecode)
            a.frombytes(blob)
            if swap:
                a.byteswap()
            return a

        line._users = list(d["users"])
        n = len(line._users)
        for name in cls._COLUMNS:
            col = column(getattr(line, name).typecode, d["cols"][name[1:]])
            if len(col) != n:
                raise DecodeError(f"line snapshot column {name[1:]!r} has {len(col)} rows, not {n}")
            setattr(line, name, col)
        line._index = {u: i for i, u in enumerate(line._users)}
        if len(d["lanes"]) != line.config.lanes:
            raise DecodeError("line snapshot lane count differs from its config")
        for i, (order, tree, head, waiting) in enumerate(d["lanes"]):
            line._order[i] = column("i", order)
            line._gone[i] = Marks(column("i", tree))
            st = line._st
            line._gone[i].rebuild([slot for slot, eid in enumerate(line._order[i])
                                   if st[eid] != WAITING])
            line._head[i], line._lane_waiting[i] = int(head), int(waiting)
            if len(line._order[i]) - line._gone[i].total() != waiting and not d["closed"]:
                raise DecodeError(f"line snapshot lane {i} counts do not agree")
        line._pre, line._pre_waiting = column("i", d["pre"]), int(d["pre_n"])
        line._buying = {int(e): int(q) for e, q in d["buying"]}
        line._sold = [int(s) for s in d["sold"]]
        if len(line._sold) != len(line._types):
            raise DecodeError("line snapshot sold counts do not match its ticket types")
        st, oq, tt = line._st, line._oq, line._tt
        blob = st.tobytes()
        for code in (OFFERED, PURCHASING):
            at = blob.find(bytes([code]))
            while at >= 0:
                line._held[tt[at]] += oq[at]
                line._live_offers += 1
                if code == OFFERED:
                    line._expiry.append((line._ox[at], at))
                elif at not in line._buying:
                    raise DecodeError(f"line snapshot entry {at} is purchasing without a quantity")
                at = blob.find(bytes([code]), at + 1)
        heapq.heapify(line._expiry)
        if any(c - s - h < 0 for c, s, h in zip(line._cap, line._sold, line._held)):
            raise DecodeError("line snapshot holds more seats than the event has")
        line._grants = [float(g) for g in d["grants"]]
        line._first_grant = d["first_grant"]
        line._opened, line._opened_at, line._seed = bool(d["opened"]), d["opened_at"], d["seed"]
        line._closed, line.version = bool(d["closed"]), int(d["version"])
        line._n.update({k: int(v) for k, v in d["n"].items() if k in line._n})
        line._check_restored()
        return line

    def _check_restored(self) -> None:
        """Bounds every later read relies on: a snapshot that passes restores a line whose
        queries cannot fail (corruption is refused here, not at the first position read)."""
        cfg, n = self.config, len(self._users)
        for name in TUNABLE:
            _check_tunable(name, getattr(cfg, name))
        if not all(type(u) is str for u in self._users):
            raise DecodeError("line snapshot holds a user id that is not a string")

        def within(col: array[Any], lo: int, hi: int, what: str) -> None:
            if len(col) and (min(col) < lo or max(col) >= hi):
                raise DecodeError(f"line snapshot {what} out of range")

        within(self._st, 0, len(STATUSES), "status")
        within(self._lane, 0, cfg.lanes, "lane")
        within(self._tt, 0, len(self._types), "ticket type")
        within(self._qty, 0, 128, "quantity")
        within(self._oq, 0, 128, "offered quantity")
        within(self._pre, 0, n, "pre-queue entry")
        lens = [len(o) for o in self._order]
        for lane, (order, gone) in enumerate(zip(self._order, self._gone)):
            within(order, 0, n, f"lane {lane} entry")
            if gone.cap < len(order) or not 0 <= self._head[lane] <= len(order):
                raise DecodeError(f"line snapshot lane {lane} does not cover its slots")
        if any(s >= lens[lane] for s, lane in zip(self._seq, self._lane)) or (
                len(self._seq) and min(self._seq) < -1):
            raise DecodeError("line snapshot slot out of range")
        if any(not 0 <= e < n or q < 0 for e, q in self._buying.items()):
            raise DecodeError("line snapshot purchase out of range")
        for name in ("_first_grant", "_opened_at"):
            value = getattr(self, name)
            if value is not None and not _is_num(value):
                raise DecodeError(f"line snapshot {name[1:]} is not a number")
        if self._seed is not None and not _is_int(self._seed):
            raise DecodeError("line snapshot seed is not an integer")
