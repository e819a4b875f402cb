"""A replica's mirror of line entries answers exactly what the line would, or defers.

The line, its change feed and the mirror are driven here as the actor and a replica drive
them (`EventQueue._commit`, `read_many`, `changes`; `Runtime.entry`), without Ray: random
joins in two lanes, leaves, releases, purchases, offers, expiries, configuration and a
sale opening, with the mirror catching up at random moments. Over the app, see
`tests/test_api_queue.py::test_position_reads_see_every_acknowledged_write`.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from actors.event_queue import view_dict
from actors.feed import ChangeFeed
from actors.line import LineConfig, WaitingLine
from eventpulse.errors import EventPulseError
from serve.mirror import BEHIND, MISS, LineMirror

T = 1_000.0


class Actor:
    """What `EventQueue` does around its line, without Ray."""

    def __init__(self, line: WaitingLine, count: int = 0) -> None:
        self.line = line
        self.count = count  # facts applied (`EventQueue._applied`)
        self.feed = ChangeFeed(count)

    def commit(self, facts: list[dict[str, Any]]) -> None:
        self.count += len(facts)
        self.feed.record(self.count, facts, self.line.moves)
        self.line.moves.clear()

    def read(self, user: str, now: float) -> tuple[str, int, dict[str, Any] | None, int, int]:
        lane, slot = self.line.place(user) or (0, -1)
        return self.feed.id, self.count, view_dict(self.line.view(user, now)), lane, slot

    def changes(self, seen: int, now: float) -> tuple[str, int, float | None, list | None]:
        return (self.feed.id, self.count, self.line.outflow(now),
                self.feed.after(seen, self.count))


def step(actor: Actor, rng: random.Random, users: list[str], now: float) -> None:
    line, user, r = actor.line, rng.choice(users), rng.random()
    try:
        if r < 0.35:
            facts = line.join(user, rng.randint(1, 2), now, lane=rng.choice([0, 1, 1, 1]))[1]
        elif r < 0.5:
            facts = line.leave(user, now)
        elif r < 0.6:
            facts = line.release(user, now)
        elif r < 0.7:
            facts = line.begin_purchase(user, 1, now)
        elif r < 0.8:
            facts = (line.complete_purchase(user, now) if rng.random() < 0.7
                     else line.fail_purchase(user, now))
        elif r < 0.82:
            facts = line.configure(now, max_live_offers=rng.randint(1, 4))
        else:
            facts = []
    except EventPulseError:
        facts = []
    actor.commit(facts + line.tick(now, seed=rng.getrandbits(32)))


def without_eta(view: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if view is None else {k: v for k, v in view.items() if k != "eta_seconds"}


def random_sale(seed: int) -> tuple[random.Random, WaitingLine, Actor, LineMirror, list[str]]:
    """A line of random capacity and offers (its sale open, or opening at T + 20), its
    actor, an empty mirror, and 24 users."""
    rng = random.Random(seed)
    line = WaitingLine(LineConfig(
        capacity={"general": rng.randint(4, 14)}, max_per_user=2, offer_seconds=4.0,
        max_live_offers=rng.choice([1, 2, 3]), abandon_after_s=None,
        sale_opens_at=T + 20 if seed % 3 == 0 else None))
    return rng, line, Actor(line), LineMirror(), [f"u{i}" for i in range(24)]


@pytest.mark.parametrize("seed", range(30))
def test_the_mirror_answers_what_the_line_would(seed: int) -> None:
    rng, line, actor, mirror, users = random_sale(seed)
    now, answered, waiting = T, 0, 0
    mirror.update(*actor.changes(mirror.count, now))
    for _ in range(700):
        now += rng.uniform(0, 0.3)
        step(actor, rng, users, now)
        polled = rng.random() < 0.5
        if polled:
            mirror.update(*actor.changes(mirror.count, now))
        user = rng.choice(users)
        # every applied fact counts as durable here: the strictest a read can be asked
        got = mirror.read(user, actor.count)
        if got is BEHIND:  # a reader waits for the follower's next answer
            mirror.update(*actor.changes(mirror.count, now))
            polled = True
            got = mirror.read(user, actor.count)
            assert got is not BEHIND
        if got is MISS:
            mirror.keep(user, *actor.read(user, now))
            continue
        want = view_dict(line.view(user, now))
        assert without_eta(got) == without_eta(want), f"step {_}: {user}"
        if want is not None and want["position"] is not None:
            waiting += 1
            if polled:  # the same outflow as the line's now
                assert got["eta_seconds"] == want["eta_seconds"]
        answered += 1
    # the mirror answered, waiting entries too, not only deferred
    assert answered > 150 and waiting > 50


@pytest.mark.parametrize("seed", range(30))
def test_the_hubs_views_of_its_listeners_are_what_the_line_would_say(seed: int) -> None:
    """`views`, the SSE hub's read of all its listeners after each follower answer: every
    entry it gives is the line's, ETA included; what it cannot give it leaves to the actor
    (MISS), and the hub keeps the actor's answer for the next round."""
    rng, line, actor, mirror, users = random_sale(seed)
    listeners = rng.sample(users, 16)
    now, pushed, moved, given, by_read = T, 0, 0, 0, 0
    plain = mirror.read
    reads = [0]

    def counted(user: str, durable: int) -> Any:
        reads[0] += 1
        return plain(user, durable)

    mirror.read = counted  # type: ignore[method-assign]
    mirror.update(*actor.changes(mirror.count, now))
    for _ in range(400):
        for _ in range(rng.randint(0, 4)):  # a few facts between the follower's answers
            now += rng.uniform(0, 0.3)
            step(actor, rng, users, now)
        if rng.random() < 0.3:  # a position read meanwhile keeps its entry at another count
            user = rng.choice(listeners)
            got = mirror.read(user, 0)
            if got is MISS:
                mirror.keep(user, *actor.read(user, now))
        mirror.update(*actor.changes(mirror.count, now))
        before = reads[0]
        views = mirror.views(listeners)
        by_read += reads[0] - before
        given += len(views)
        for user, got in zip(listeners, views):
            if got is MISS:
                mirror.keep(user, *actor.read(user, now))
                continue
            want = view_dict(line.view(user, now))
            assert got == want, f"round {_}: {user}"
            pushed += 1
            moved += want is not None and want["position"] is not None
    assert pushed > 2000 and moved > 500  # answered, waiting entries too
    assert by_read < given / 2, (by_read, given)  # most by the one pass, not entry by entry


def test_a_mirror_behind_the_journal_defers_to_the_actor() -> None:
    line = WaitingLine(LineConfig(capacity={"general": 1}, abandon_after_s=None))
    actor, mirror = Actor(line), LineMirror()
    for u in "abc":
        actor.commit(line.join(u, 1, T)[1] + line.tick(T))
    mirror.update(*actor.changes(mirror.count, T))
    mirror.keep("c", *actor.read("c", T))
    assert mirror.read("c", actor.count)["position"] == 2  # a holds the one seat
    actor.commit(line.leave("b", T))  # journaled, the follower not asked yet
    assert mirror.read("c", actor.count) is BEHIND
    mirror.update(*actor.changes(mirror.count, T))
    assert mirror.read("c", actor.count)["position"] == 1
    assert mirror.holds("c")
    actor.commit(line.release("a", T) + line.tick(T))  # c's own entry changes: read again
    mirror.update(*actor.changes(mirror.count, T))
    assert not mirror.holds("c") and mirror.read("c", actor.count) is MISS
    mirror.keep("c", *actor.read("c", T))
    assert mirror.read("c", actor.count)["status"] == "offered"


def test_a_mirror_the_feed_left_behind_or_a_restarted_actor_starts_anew() -> None:
    line = WaitingLine(LineConfig(capacity={"general": 1}, abandon_after_s=None))
    actor, mirror = Actor(line), LineMirror()
    actor.feed.keep = 5
    actor.commit(line.join("first", 1, T)[1] + line.tick(T))
    mirror.update(*actor.changes(mirror.count, T))
    mirror.keep("first", *actor.read("first", T))
    seen = mirror.count
    for i in range(10):
        actor.commit(line.join(f"w{i}", 1, T)[1])
    assert actor.feed.after(seen, actor.count) is None
    mirror.update(*actor.changes(mirror.count, T))
    assert mirror.read("first", actor.count) is MISS  # started anew: read again
    mirror.keep("first", *actor.read("first", T))
    assert mirror.read("first", actor.count)["status"] == "offered"
    # the same line in a restarted actor: another feed, counting on from the journal
    restarted = Actor(line, actor.count)
    mirror.update(*restarted.changes(mirror.count, T))
    assert mirror.read("first", restarted.count) is MISS
    stale = actor.read("first", T)  # an answer of the old actor arriving late
    mirror.keep("first", *stale)
    assert mirror.read("first", restarted.count) is MISS
