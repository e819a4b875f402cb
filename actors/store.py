"""Durable form of one event's line: a journal of facts and a msgpack snapshot in Redis.

Journal records are `{"v": 1, "n": first_fact_number, "f": [facts…]}`, one per group
commit. The snapshot records how many facts it covers (`n`), so replay skips facts the
snapshot already holds and a snapshot can be taken while later facts are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from eventpulse import keys
from eventpulse.errors import DecodeError
from eventpulse.redis import RedisClient

FORMAT = 1


def encode_record(first: int, facts: list[dict[str, Any]]) -> bytes:
    return msgpack.packb({"v": FORMAT, "n": first, "f": facts}, use_bin_type=True)


def encode_snapshot(covered: int, line_state: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": FORMAT, "n": covered, "line": line_state}, use_bin_type=True)


def _decode(blob: bytes, event_id: str, what: str) -> dict[str, Any]:
    try:
        data = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception as e:
        raise DecodeError(f"{what} of event {event_id} is not valid msgpack: {e}") from e
    if not isinstance(data, dict) or data.get("v") != FORMAT or not isinstance(data.get("n"), int):
        raise DecodeError(f"{what} of event {event_id} has an unknown format")
    return data


def decode_record(blob: bytes, event_id: str) -> tuple[int, list[dict[str, Any]]]:
    data = _decode(blob, event_id, "journal record")
    facts = data.get("f")
    if not isinstance(facts, list) or not all(isinstance(f, dict) for f in facts):
        raise DecodeError(f"journal record of event {event_id} holds no list of facts")
    return data["n"], facts


def decode_snapshot(blob: bytes, event_id: str) -> tuple[int, dict[str, Any]]:
    data = _decode(blob, event_id, "snapshot")
    if not isinstance(data.get("line"), dict):
        raise DecodeError(f"snapshot of event {event_id} holds no line state")
    return data["n"], data["line"]


@dataclass
class Loaded:
    covered: int  # facts the snapshot holds
    line_state: dict[str, Any] | None
    tail: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (number, fact)
    records: list[tuple[int, int]] = field(default_factory=list)  # (first, count) per record

    @property
    def next_number(self) -> int:
        return max([self.covered] + [n + 1 for n, _ in self.tail[-1:]])


async def load(r: RedisClient, event_id: str) -> Loaded:
    """Read the snapshot and the journal in one round trip; decode, refusing to guess."""
    pipe = r.pipeline(transaction=True)
    pipe.get(keys.snapshot(event_id))
    pipe.lrange(keys.journal(event_id), 0, -1)
    snap, journal = await pipe.execute()
    covered, state = decode_snapshot(snap, event_id) if snap else (0, None)
    loaded = Loaded(covered, state)
    expected = None
    for blob in journal:
        first, facts = decode_record(blob, event_id)
        if expected is not None and first != expected:
            raise DecodeError(f"journal of event {event_id} has a gap at fact {expected}")
        expected = first + len(facts)
        loaded.records.append((first, len(facts)))
        loaded.tail.extend((first + i, f) for i, f in enumerate(facts) if first + i >= covered)
    return loaded


async def append(r: RedisClient, event_id: str, first: int, facts: list[dict[str, Any]]) -> None:
    """Journal facts `first`… and, in the same transaction, how many facts are durable now
    (a replica answering from its mirror of the line checks it has seen that many)."""
    pipe = r.pipeline(transaction=True)
    pipe.rpush(keys.journal(event_id), encode_record(first, facts))
    pipe.set(keys.line_durable(event_id), first + len(facts))
    await pipe.execute()


async def write_snapshot(r: RedisClient, event_id: str, covered: int, line_state: dict[str, Any],
                         trim: int) -> int:
    """Store the snapshot and drop the `trim` journal records it fully covers, atomically."""
    blob = encode_snapshot(covered, line_state)
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.snapshot(event_id), blob)
    if trim:
        pipe.ltrim(keys.journal(event_id), trim, -1)
    await pipe.execute()
    return len(blob)
