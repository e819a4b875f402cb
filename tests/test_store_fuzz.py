"""Corrupt or random stored bytes never crash a decoder with anything but DecodeError.

A snapshot or journal record that cannot be trusted must stop the actor with an error
naming the event (fail closed), never a stray TypeError that looks like a bug, and
never a silently wrong line.
"""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import store
from actors.line import LineConfig, WaitingLine
from eventpulse.errors import DecodeError

EVENT = "ev-fuzz-1"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=16))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner, max_size=4),
                      max_leaves=20)


def sample_line() -> WaitingLine:
    line = WaitingLine(LineConfig(capacity={"general": 3, "vip": 1}))
    line.join_many([(f"user{i}", 1 + i % 2, None, None) for i in range(6)], 1000.0)
    line.tick(1000.5, seed=7)
    line.begin_purchase("user0", 1, 1001.0)
    line.leave("user4", 1002.0)
    return line


def sample_facts() -> list[dict]:
    line = WaitingLine(LineConfig(capacity={"general": 3}))
    _, facts = line.join_many([(f"u{i}", 1, None, None) for i in range(5)], 1000.0)
    facts += line.tick(1000.5, seed=7)
    return facts + line.release("u0", 1001.0)


SNAPSHOT = sample_line().to_snapshot()
FACTS = sample_facts()


def mutate(blob: bytes, data) -> bytes:
    """Flip, drop or insert a few bytes of a valid blob."""
    b = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
        at = data.draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[at] ^= data.draw(st.integers(1, 255))
        elif op == "drop" and b:
            del b[at]
        elif op == "insert":
            b.insert(at, data.draw(st.integers(0, 255)))
        else:
            del b[at:]
    return bytes(b)


def read_everything(line: WaitingLine) -> None:
    line.view_many([f"user{i}" for i in range(6)] + ["nobody"], 1003.0)
    line.stats(1003.0)
    line.availability()
    line.next_deadline(1003.0)


def check_decode(fn, blob: bytes):
    try:
        return fn(blob, EVENT)
    except DecodeError as e:
        assert EVENT in str(e), e
        return None


def check_line(build):
    try:
        return build()
    except DecodeError:
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_decode_error(blob):
    check_decode(store.decode_record, blob)
    check_decode(store.decode_snapshot, blob)


@FUZZ
@given(values)
def test_random_msgpack_structures_decode_or_raise_decode_error(value):
    blob = msgpack.packb(value, use_bin_type=True)
    check_decode(store.decode_record, blob)
    check_decode(store.decode_snapshot, blob)
    wrapped = msgpack.packb({"v": 1, "n": 0, "f": [value], "line": value}, use_bin_type=True)
    check_decode(store.decode_record, wrapped)
    check_decode(store.decode_snapshot, wrapped)


@FUZZ
@given(st.data())
def test_corrupted_snapshot_bytes_restore_or_raise_decode_error(data):
    blob = mutate(store.encode_snapshot(7, SNAPSHOT), data)
    decoded = check_decode(store.decode_snapshot, blob)
    if decoded is not None:
        line = check_line(lambda: WaitingLine.from_snapshot(decoded[1]))
        if line is not None:  # a line that restores must answer reads without crashing
            read_everything(line)


@FUZZ
@given(st.data())
def test_snapshot_with_random_fields_restores_or_raises_decode_error(data):
    state = dict(SNAPSHOT)
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(sorted(state)))
        state[field] = data.draw(values)
    restored = check_line(lambda: WaitingLine.from_snapshot(
        msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False)))
    if restored is not None:
        read_everything(restored)


@FUZZ
@given(st.data())
def test_corrupted_journal_records_replay_or_raise_decode_error(data):
    blob = mutate(store.encode_record(0, FACTS), data)
    decoded = check_decode(store.decode_record, blob)
    if decoded is not None:
        line = WaitingLine(LineConfig(capacity={"general": 3}))
        for fact in decoded[1]:
            if check_line(lambda: line.apply(fact)) is None:
                break


@FUZZ
@given(st.lists(values | st.fixed_dictionaries({"k": st.sampled_from(
    ["j", "lv", "o", "x", "r", "a", "so", "p", "b", "pf", "c", "op", "cl"])}, optional={
        "u": st.sampled_from(["u0", "u1"]) | values, "q": values, "t": values,
        "l": values, "at": values, "s": values, "x": values}), max_size=8))
def test_random_facts_apply_or_raise_decode_error(facts):
    line = WaitingLine(LineConfig(capacity={"general": 3}))
    for fact in facts:
        if check_line(lambda: line.apply(fact)) is None:
            break
