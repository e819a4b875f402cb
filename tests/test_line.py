"""The pure waiting line: scenarios (table-driven where it reads better) and properties."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.line import LineConfig, WaitingLine
from eventpulse.errors import (
    AlreadyPurchased, Conflict, DecodeError, EntryNotFound, InvalidInput, NoOffer, OfferExpired,
    QueueClosed, SoldOut,
)

T = 1_000.0  # an arbitrary "now"


def make(capacity: int | dict[str, int] = 10, **cfg: Any) -> WaitingLine:
    cap = capacity if isinstance(capacity, dict) else {"general": capacity}
    cfg.setdefault("abandon_after_s", None)
    return WaitingLine(LineConfig(capacity=cap, **cfg))


def journal(facts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Facts as they come back from Redis."""
    return msgpack.unpackb(msgpack.packb(facts, use_bin_type=True), raw=False)


def joined(line: WaitingLine, users: str | list[str], now: float = T, quantity: int = 1,
           **kw: Any) -> list[dict[str, Any]]:
    facts: list[dict[str, Any]] = []
    for u in users:
        facts += line.join(u, quantity, now, **kw)[1]
    return facts + line.tick(now)


def status(line: WaitingLine, user: str, now: float = T) -> str | None:
    v = line.view(user, now)
    return None if v is None else v.status


def fingerprint(line: WaitingLine, users: list[str], now: float, deadline: bool = True) -> tuple[Any, ...]:
    return (line.view_many(users, now), line.stats(now), line.availability(), line.version,
            line.next_deadline(now) if deadline else None)


# ----------------------------------------------------------------- joining

def test_join_is_idempotent() -> None:
    line = make()
    first, facts = line.join("a", 2, T)
    again, more = line.join("a", 3, T + 5)
    assert facts and more == []
    assert again == first and line.stats(T)["waiting"] == 1


def test_join_after_leaving_goes_to_the_back() -> None:
    line = make(1)
    joined(line, "xab")  # x gets the only seat
    line.leave("a", T)
    view, facts = line.join("a", 1, T + 1)
    assert facts and view.position == 2 and line.position("b") == 1


@pytest.mark.parametrize("quantity", [0, -1, 5, "2", 2.0, True, None])
def test_bad_quantity_raises_invalid_input(quantity: Any) -> None:
    with pytest.raises(InvalidInput):
        make(max_per_user=4).join("a", quantity, T)


@pytest.mark.parametrize("kwargs", [{"ticket_type": "balcony"}, {"ticket_type": 3},
                                    {"lane": 2}, {"lane": -1}, {"lane": "0"}])
def test_bad_ticket_type_or_lane_raises_invalid_input(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        make().join("a", 1, T, **kwargs)


@pytest.mark.parametrize("user", ["", 7, None, "u" * 257])
def test_bad_user_raises_invalid_input(user: Any) -> None:
    with pytest.raises(InvalidInput):
        make().join(user, 1, T)


def test_join_after_purchase_raises_already_purchased() -> None:
    line = make()
    joined(line, "a")
    line.begin_purchase("a", 1, T)
    line.complete_purchase("a", T)
    with pytest.raises(AlreadyPurchased):
        line.join("a", 1, T)


def test_join_on_closed_line_raises_queue_closed() -> None:
    line = make()
    line.close(T)
    with pytest.raises(QueueClosed):
        line.join("a", 1, T)


def test_join_of_a_sold_out_type_raises_sold_out() -> None:
    line = make({"general": 5, "vip": 1})
    joined(line, "a", ticket_type="vip")
    line.begin_purchase("a", 1, T)
    line.complete_purchase("a", T)
    with pytest.raises(SoldOut):
        line.join("b", 1, T, ticket_type="vip")
    assert line.join("b", 1, T)[0].ticket_type == "general"


def test_join_many_isolates_bad_items() -> None:
    line = make()
    results, facts = line.join_many([("a", 1), ("b", 9), "junk", ("a", 2, None, None),
                                     ("c", 1, "general", 0)], T)
    assert [type(r).__name__ for r in results] == [
        "EntryView", "InvalidInput", "InvalidInput", "EntryView", "EntryView"]
    assert len(facts) == 2  # a and c; a's second join returns the live entry
    assert line.position("c") == 1 and line.position("a") == 2  # the priority lane goes first


# ----------------------------------------------------------------- offers

def test_head_gets_offer_and_positions_move() -> None:
    line = make(2)
    joined(line, "abcd")
    assert [status(line, u) for u in "abcd"] == ["offered", "offered", "waiting", "waiting"]
    assert [line.position(u) for u in "abcd"] == [None, None, 1, 2]
    v = line.view("a", T)
    assert v is not None and v.offer_quantity == 1 and v.offer_expires_at == T + 1800


def test_expired_offer_passes_to_next() -> None:
    line = make(1, offer_seconds=60)
    joined(line, "ab")
    assert line.next_deadline(T) == T + 60
    assert line.tick(T + 59.9) == []
    facts = line.tick(T + 60)
    assert [(f["k"], f["u"]) for f in facts] == [("x", "a"), ("o", "b")]
    assert status(line, "a") == "expired" and status(line, "b") == "offered"


@pytest.mark.parametrize("command", ["release", "leave"])
def test_freed_offer_passes_to_next_at_once(command: str) -> None:
    line = make(1)
    joined(line, "ab")
    facts = getattr(line, command)("a", T + 1)
    assert [f["k"] for f in facts] == ["r" if command == "release" else "lv", "o"]
    assert status(line, "b") == "offered"


def test_leave_and_release_errors() -> None:
    line = make(1)
    joined(line, "ab")
    with pytest.raises(EntryNotFound):
        line.leave("zz", T)
    with pytest.raises(NoOffer):
        line.release("b", T)
    line.begin_purchase("a", 1, T)
    with pytest.raises(Conflict):
        line.leave("a", T)


def test_priority_lane_served_first() -> None:
    line = make(1)
    joined(line, "x")  # holds the only seat
    joined(line, "ab")
    joined(line, "p", lane=0)
    assert [line.position(u) for u in "pab"] == [1, 2, 3]
    line.release("x", T + 1)
    assert status(line, "p") == "offered" and line.position("a") == 1


def test_abandoned_entry_is_skipped() -> None:
    line = make(1, abandon_after_s=300)
    joined(line, "x", now=T)
    joined(line, "ab", now=T)
    line.touch("b", T + 200)
    facts = line.release("x", T + 400)
    assert [(f["k"], f["u"]) for f in facts] == [("r", "x"), ("a", "a"), ("o", "b")]
    assert status(line, "a") == "abandoned"


def test_partial_offer_when_fewer_seats_left() -> None:
    line = make(5)
    joined(line, "a", quantity=4)
    joined(line, "b", quantity=4)
    assert line.view("b", T).offer_quantity == 1  # type: ignore[union-attr]


def test_blocked_lane_keeps_strict_fifo() -> None:
    line = make({"general": 1, "vip": 5})
    joined(line, "a")  # holds the only general seat
    joined(line, "b")  # general: must wait for a's seat
    joined(line, "c", ticket_type="vip")  # same lane, behind b: not served before b
    assert status(line, "b") == "waiting" and status(line, "c") == "waiting"
    line.release("a", T)
    assert status(line, "b") == "offered" and status(line, "c") == "offered"


def test_sold_out_closes_waiting_entries() -> None:
    line = make(2)
    joined(line, "a", quantity=2)
    joined(line, "bc")
    line.begin_purchase("a", 2, T)
    facts = line.complete_purchase("a", T + 1)
    assert [(f["k"], f.get("u")) for f in facts] == [("b", "a"), ("so", "b"), ("so", "c")]
    assert line.availability()["sold_out"] and line.stats(T)["waiting"] == 0


def test_offers_per_minute_limits_outflow() -> None:
    line = make(100, offers_per_minute=2)
    joined(line, "abcd")
    assert [status(line, u) for u in "abcd"] == ["offered", "offered", "waiting", "waiting"]
    assert line.next_deadline(T) == T + 60
    assert line.tick(T + 59) == []
    assert [f["u"] for f in line.tick(T + 60)] == ["c", "d"]


def test_max_live_offers_limits_outflow() -> None:
    line = make(100, max_live_offers=1)
    joined(line, "ab")
    assert status(line, "b") == "waiting"
    line.begin_purchase("a", 1, T)
    assert line.tick(T) == []  # purchasing still counts as live
    facts = line.complete_purchase("a", T)
    assert [f["k"] for f in facts] == ["b", "o"] and status(line, "b") == "offered"


def test_paused_line_grants_nothing_until_resumed() -> None:
    line = make(10, paused=True)
    joined(line, "ab")
    assert status(line, "a") == "waiting" and line.position("b") == 2
    facts = line.configure(T, paused=False)
    assert facts == [{"k": "c", "ch": {"paused": False}, "at": T}]
    assert [f["u"] for f in line.tick(T)] == ["a", "b"]


def test_configure_validates_and_skips_no_ops() -> None:
    line = make()
    for bad in ({"offers_per_minute": 0}, {"offer_seconds": -1}, {"paused": "yes"},
                {"capacity": 3}, {"abandon_after_s": float("nan")}):
        with pytest.raises(InvalidInput):
            line.configure(T, **bad)
    assert line.configure(T, paused=False, max_live_offers=None) == []
    assert line.configure(T, offer_seconds=60)[0]["ch"] == {"offer_seconds": 60.0}
    assert line.stats(T)["offer_seconds"] == 60.0


def test_eta_uses_measured_outflow() -> None:
    line = make(3, offer_seconds=30)
    joined(line, "abc")
    assert line.view("a", T).eta_seconds is None  # type: ignore[union-attr]
    joined(line, "def", now=T + 10)
    # 3 offers measured over (at least) one minute: 3 per minute
    assert line.view("e", T + 10).eta_seconds == pytest.approx(2 * 20)  # type: ignore[union-attr]
    assert line.stats(T + 10)["outflow_per_minute"] == pytest.approx(3)


# ----------------------------------------------------------------- pre-queue

def prequeue_line(seed: int) -> tuple[WaitingLine, list[dict[str, Any]]]:
    line = make(2, sale_opens_at=T + 100)
    users = [f"u{i}" for i in range(20)]
    facts = joined(line, users, now=T)
    facts += line.tick(T + 100, seed=seed)
    return line, facts


def test_prequeue_waits_for_the_opening() -> None:
    line = make(2, sale_opens_at=T + 100)
    joined(line, "ab")
    assert line.view("a", T).position is None  # type: ignore[union-attr]
    assert line.stats(T)["prequeue"] == 2 and line.next_deadline(T) == T + 100
    assert line.tick(T + 99) == []


def test_prequeue_shuffle_is_reproducible_from_seed() -> None:
    one, facts = prequeue_line(seed=42)
    two, _ = prequeue_line(seed=42)
    other, _ = prequeue_line(seed=43)
    users = [f"u{i}" for i in range(20)]
    order = sorted(users, key=lambda u: one.position(u) or 0)
    assert order == sorted(users, key=lambda u: two.position(u) or 0)
    assert order != sorted(users, key=lambda u: other.position(u) or 0)
    assert {f["k"] for f in facts} >= {"op", "o"} and one.stats(T)["seed"] == 42
    replayed = make(2, sale_opens_at=T + 100)
    for f in journal(facts):
        replayed.apply(f)
    assert fingerprint(replayed, users, T + 100) == fingerprint(one, users, T + 100)


def test_prequeue_draw_is_uniform_enough() -> None:
    first = {f"u{i}": 0 for i in range(4)}
    for seed in range(400):
        line = make(1, sale_opens_at=T + 1)
        joined(line, list(first), now=T)
        line.tick(T + 1, seed=seed)
        first[next(u for u in first if status(line, u, T + 1) == "offered")] += 1
    assert all(60 < n < 140 for n in first.values()), first


def test_join_after_opening_is_fifo_behind_the_draw() -> None:
    line, _ = prequeue_line(seed=1)
    view, _ = line.join("late", 1, T + 101)
    assert view.position == 19


# ----------------------------------------------------------------- purchases

def offered_line() -> WaitingLine:
    line = make(2, offer_seconds=60, max_per_user=2)
    joined(line, "a", quantity=2)
    joined(line, "b")
    return line


@pytest.mark.parametrize("steps, expected_status, error", [
    ([("begin", 2, T + 1), ("complete", T + 2)], "purchased", None),
    ([("begin", 2, T + 1), ("fail", False, T + 2)], "offered", None),
    ([("begin", 2, T + 1), ("fail", False, T + 61)], "expired", None),
    ([("begin", 2, T + 1), ("fail", True, T + 2)], "released", None),
    ([("begin", 3, T + 1)], "offered", InvalidInput),
    ([("begin", 1, T + 60)], "offered", OfferExpired),
    ([("complete", T + 1)], "offered", NoOffer),
    ([("begin", 2, T + 1), ("complete", T + 2), ("complete", T + 3)], "purchased", AlreadyPurchased),
    ([("begin", 2, T + 1), ("begin", 2, T + 2)], "purchasing", None),  # a retry is a no-op
    ([("begin", 2, T + 1), ("begin", 1, T + 2)], "purchasing", Conflict),
])
def test_purchase_outcomes(steps: list[tuple[Any, ...]], expected_status: str,
                           error: type[Exception] | None) -> None:
    line = offered_line()
    raised = None
    for step in steps:
        try:
            if step[0] == "begin":
                line.begin_purchase("a", step[1], step[2])
            elif step[0] == "complete":
                line.complete_purchase("a", step[1])
            else:
                line.fail_purchase("a", step[2], declined=step[1])
        except Exception as e:  # noqa: BLE001 — the table names the expected error
            raised = e
    assert type(raised) is error if error else raised is None
    assert status(line, "a") == expected_status


def test_purchasing_offer_does_not_expire() -> None:
    line = offered_line()
    line.begin_purchase("a", 2, T + 59)
    assert line.tick(T + 600) == [] and line.next_deadline(T + 600) is None
    assert status(line, "a") == "purchasing"


def test_partial_purchase_returns_unbought_seats() -> None:
    line = offered_line()
    line.begin_purchase("a", 1, T)
    facts = line.complete_purchase("a", T)
    assert [(f["k"], f["u"]) for f in facts] == [("b", "a"), ("o", "b")]
    assert line.availability() | {"by_type": None} == {
        "total": 2, "sold": 1, "held": 1, "remaining": 0, "sold_out": False, "by_type": None}


def test_purchase_batches_report_per_item() -> None:
    line = make(3, offer_seconds=60)
    joined(line, "abc")
    joined(line, "d")
    results, facts = line.begin_purchase_many([("a", 1), ("zz", 1), ("b", 5), ["c"]], T + 1)
    assert [type(r).__name__ if r else None for r in results] == [
        None, "NoOffer", "InvalidInput", "InvalidInput"]
    results, facts = line.begin_purchase_many([("b", 1), ("c", 1)], T + 61)
    assert [type(r).__name__ for r in results] == ["OfferExpired", "OfferExpired"]
    assert [f["k"] for f in facts] == ["x", "x", "o"]  # expired here; d gets the seats
    results, facts = line.finish_purchase_many([("a", "committed"), ("d", "committed"),
                                                ("a", "committed"), ("a", "refunded")], T + 62)
    assert [type(r).__name__ if r else None for r in results] == [
        None, "NoOffer", "AlreadyPurchased", "InvalidInput"]


def test_close_cancels_live_entries() -> None:
    line = make(1)
    joined(line, "abc")
    line.begin_purchase("a", 1, T)
    facts = line.close(T + 1)
    assert facts == [{"k": "cl", "at": T + 1}] and line.close(T + 2) == []
    assert {status(line, u) for u in "abc"} == {"cancelled"}
    s = line.stats(T + 1)
    assert (s["waiting"], s["live_offers"], s["closed"], line.next_deadline(T)) == (0, 0, True, None)
    with pytest.raises(NoOffer):
        line.complete_purchase("a", T + 2)


# ----------------------------------------------------------------- durability

def busy_line() -> tuple[WaitingLine, list[dict[str, Any]], list[str]]:
    line = make({"general": 3, "vip": 2}, offer_seconds=30, offers_per_minute=4,
                abandon_after_s=100, sale_opens_at=T + 10, max_per_user=3)
    facts = []
    facts += line.join_many([(u, 2, "vip" if u in "cf" else None, 0 if u == "e" else None)
                             for u in "abcdef"], T)[1]
    facts += line.tick(T + 10, seed=7)
    facts += line.join_many([("g", 1), ("h", 3)], T + 11)[1] + line.tick(T + 11)
    first = next(u for u in "abcdef" if status(line, u, T + 11) == "offered")
    facts += line.begin_purchase(first, 1, T + 12)
    facts += line.complete_purchase(first, T + 13)
    facts += line.configure(T + 14, max_live_offers=3)
    facts += line.tick(T + 45) + line.tick(T + 75) + line.tick(T + 200)
    return line, facts, list("abcdefgh")


def test_replay_of_facts_rebuilds_identical_line() -> None:
    line, facts, users = busy_line()
    again = make({"general": 3, "vip": 2}, offer_seconds=30, offers_per_minute=4,
                 abandon_after_s=100, sale_opens_at=T + 10, max_per_user=3)
    for f in journal(facts):
        again.apply(f)
    for now in (T + 200, T + 230, T + 400):
        assert fingerprint(again, users, now) == fingerprint(line, users, now)
    assert again.to_snapshot() == line.to_snapshot()
    assert line.version == len(facts)


def test_snapshot_roundtrip_identical() -> None:
    line, _, users = busy_line()
    line.touch("h", T + 150)
    state = msgpack.unpackb(msgpack.packb(line.to_snapshot(), use_bin_type=True), raw=False)
    again = WaitingLine.from_snapshot(state)
    for now in (T + 200, T + 260):
        assert fingerprint(again, users, now) == fingerprint(line, users, now)
    assert again.to_snapshot() == line.to_snapshot()
    assert again.tick(T + 300, seed=1) == line.tick(T + 300, seed=1)


@pytest.mark.parametrize("fact", [
    {"k": "zz", "u": "a"}, {"u": "a"}, "not a dict", {"k": "j", "u": "b"},
    {"k": "j", "u": "b", "q": 1, "t": "nope", "l": 1, "s": 1, "at": T},
    {"k": "j", "u": "b", "q": 1, "t": "general", "l": 1, "s": 7, "at": T},
    {"k": "j", "u": "a", "q": 1, "t": "general", "l": 1, "s": 1, "at": T},
    {"k": "o", "u": "a", "q": 1, "x": T, "at": T},
    {"k": "b", "u": "a", "at": T}, {"k": "c", "ch": {"speed": 3}, "at": T},
    {"k": "op", "seed": 1, "at": T}, {"k": "x", "u": "nobody", "at": T},
])
def test_bad_fact_raises_decode_error_and_changes_nothing(fact: Any) -> None:
    line = make(1)
    joined(line, "a")
    before = line.to_snapshot()
    with pytest.raises(DecodeError):
        line.apply(fact)
    assert line.to_snapshot() == before


def test_decode_error_names_the_kind() -> None:
    with pytest.raises(DecodeError, match="'zz'"):
        make().apply({"k": "zz"})


@pytest.mark.parametrize("corrupt", [
    lambda s: s.update(v=99), lambda s: s.pop("users"), lambda s: s["users"].append("extra"),
    lambda s: s["cols"].update(st=b"\x00"), lambda s: s.update(sold=[9]),
    lambda s: s["cfg"].update(colour="red"),
])
def test_corrupt_snapshot_raises_decode_error(corrupt: Any) -> None:
    line, _, _ = busy_line()
    state = copy.deepcopy(line.to_snapshot())
    corrupt(state)
    with pytest.raises(DecodeError):
        WaitingLine.from_snapshot(state)


# ----------------------------------------------------------------- properties

USERS = [f"u{i}" for i in range(8)]
_JOIN = st.tuples(st.just("join"), st.sampled_from(USERS), st.integers(1, 3),
                  st.sampled_from([None, "vip"]), st.sampled_from([None, 0]))
# begin, finish and release name a user by index among those it fits (offered / purchasing)
_BEGIN = st.tuples(st.just("begin"), st.integers(0, 7), st.sampled_from([1, 1, 2, 3]))
_FINISH = st.tuples(st.just("finish"), st.integers(0, 7),
                    st.sampled_from(["committed", "committed", "failed", "declined"]))
_WAIT = st.tuples(st.just("wait"), st.sampled_from([0.5, 5.0, 20.0, 31.0, 61.0, 200.0]))
OPS = st.one_of(  # repeated branches weigh the draw towards a sale that moves
    _JOIN, _JOIN, _JOIN, _BEGIN, _BEGIN, _BEGIN, _FINISH, _FINISH, _FINISH, _WAIT, _WAIT,
    st.tuples(st.just("leave"), st.sampled_from(USERS)),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("touch"), st.sampled_from(USERS)),
    st.tuples(st.just("configure"), st.sampled_from([
        {"paused": True}, {"paused": False}, {"paused": False}, {"offers_per_minute": 2},
        {"offers_per_minute": None}, {"max_live_offers": 2}, {"max_live_offers": None},
        {"offer_seconds": 30}])),
    st.tuples(st.just("close"), st.integers(0, 9)),  # only 0 closes: cancelling ends the story
)
CAPACITY = {"general": 5, "vip": 2}


def config(opens_at: float | None) -> LineConfig:
    return LineConfig(capacity=dict(CAPACITY), max_per_user=3, offer_seconds=45,
                      abandon_after_s=300, sale_opens_at=opens_at)


def pick(line: WaitingLine, index: int, wanted: str, now: float) -> str:
    """The index-th user whose entry is `wanted`, or a user who (most likely) is not."""
    fits = [v.user for v in line.view_many(USERS, now) if v is not None and v.status == wanted]
    return fits[index % len(fits)] if fits else USERS[index]


def check_invariants(line: WaitingLine, now: float) -> None:
    views = [v for v in line.view_many(USERS, now) if v is not None]
    avail = line.availability()["by_type"]
    for t, cap in CAPACITY.items():
        held = sum(v.offer_quantity or 0 for v in views
                   if v.ticket_type == t and v.status in ("offered", "purchasing"))
        sold = sum(v.offer_quantity or 0 for v in views if v.ticket_type == t and v.status == "purchased")
        assert avail[t]["held"] == held and avail[t]["sold"] == sold
        assert 0 <= sold + held <= cap
    live = [line._users[e] for e, s in enumerate(line._st) if s <= 2]  # internal columns
    assert len(live) == len(set(live)), "at most one live entry per user"
    waiting = sorted((v for v in views if v.position is not None), key=lambda v: v.position or 0)
    assert [v.position for v in waiting] == list(range(1, len(waiting) + 1))
    keys = [(v.lane, line._seq[line._index[v.user]]) for v in waiting]
    assert keys == sorted(keys), "positions follow (lane, sequence)"
    assert line.stats(now)["waiting"] == len(waiting)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=60), seed=st.integers(0, 2**63 - 1),
       opens_at=st.sampled_from([None, T + 30]))
def test_random_operations_keep_the_invariants(ops: list[tuple[Any, ...]], seed: int,
                                               opens_at: float | None) -> None:
    line = WaitingLine(config(opens_at))
    facts: list[dict[str, Any]] = []
    now = T
    bought: set[str] = set()
    for op in ops:
        try:
            if op[0] == "join":
                facts += line.join(op[1], op[2], now, ticket_type=op[3], lane=op[4])[1]
            elif op[0] == "leave":
                facts += line.leave(op[1], now)
            elif op[0] == "release":
                facts += line.release(pick(line, op[1], "offered", now), now)
            elif op[0] == "touch":
                line.touch(op[1], now)
            elif op[0] == "begin":
                facts += line.begin_purchase(pick(line, op[1], "offered", now), op[2], now)
            elif op[0] == "finish":
                user = pick(line, op[1], "purchasing", now)
                results, more = line.finish_purchase_many([(user, op[2])], now)
                facts += more
                if results[0] is None and op[2] == "committed":
                    assert user not in bought, "an offer is consumed at most once"
                    bought.add(user)
            elif op[0] == "wait":
                now += op[1]
            elif op[0] == "configure":
                facts += line.configure(now, **op[1])
            elif op[1] == 0:
                facts += line.close(now)
        except (InvalidInput, EntryNotFound, NoOffer, OfferExpired, AlreadyPurchased, Conflict,
                QueueClosed, SoldOut):
            pass
        facts += line.tick(now, seed=seed)
        check_invariants(line, now)
        assert line.version == len(facts)
        deadline = line.next_deadline(now)  # nothing may happen before it
        assert deadline is None or deadline > now
        assert line.tick(now + 10_000 if deadline is None else (now + deadline) / 2) == []

    replayed = WaitingLine(config(opens_at))
    for f in journal(facts):
        replayed.apply(f)
    exact = not any(op[0] == "touch" for op in ops)  # a touch (not journaled) moves deadlines
    assert fingerprint(replayed, USERS, now, exact) == fingerprint(line, USERS, now, exact)
    mine, theirs = line.to_snapshot(), replayed.to_snapshot()
    mine["cols"].pop("seen"), theirs["cols"].pop("seen")  # touches are not journaled
    assert mine == theirs

    state = msgpack.unpackb(msgpack.packb(line.to_snapshot(), use_bin_type=True), raw=False)
    restored = WaitingLine.from_snapshot(state)
    assert fingerprint(restored, USERS, now) == fingerprint(line, USERS, now)
    later = now + 500
    assert restored.tick(later, seed=1) == line.tick(later, seed=1)
