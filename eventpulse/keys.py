"""Every Redis key the project uses, in one place.

Keys of one event share the hash tag `{ev:<id>}` and keys of one user `{u:<id>}`, so
each Lua script and multi-key command stays inside one Redis Cluster slot.
"""

from __future__ import annotations

PREFIX = "ep"


def _ev(event_id: str) -> str:
    return f"{PREFIX}:{{ev:{event_id}}}"


def _u(user_id: str) -> str:
    return f"{PREFIX}:{{u:{user_id}}}"


# events ---------------------------------------------------------------------------
EVENTS_INDEX = f"{PREFIX}:events"  # sorted set: event id by creation time (own slot)


def event(event_id: str) -> str:
    """Hash: the event's fields (JSON-encoded document under 'doc')."""
    return f"{_ev(event_id)}:event"


def sold(event_id: str) -> str:
    """Hash: ticket type -> sold quantity; field '_total' for the event."""
    return f"{_ev(event_id)}:sold"


def capacity(event_id: str) -> str:
    """Hash: ticket type -> capacity; field '_total' for the event."""
    return f"{_ev(event_id)}:capacity"


def event_tickets(event_id: str) -> str:
    """Hash: ticket id -> msgpack ticket record (the event side, source of the user index)."""
    return f"{_ev(event_id)}:tickets"


def event_buyers(event_id: str) -> str:
    """Hash: user id -> the purchase id that bought (one offer buys once)."""
    return f"{_ev(event_id)}:buyers"


def idempotency(event_id: str, key: str) -> str:
    """String: the committed result of one purchase request."""
    return f"{_ev(event_id)}:idem:{key}"


def event_creation(user_id: str, key: str) -> str:
    """String: the event one organizer's Idempotency-Key created (digest + id)."""
    return f"{_u(user_id)}:idem-ev:{key}"


def purchase(event_id: str, purchase_id: str) -> str:
    """Hash: the status of one purchase request."""
    return f"{_ev(event_id)}:purchase:{purchase_id}"


def journal(event_id: str) -> str:
    """List: msgpack journal records of the event's waiting line since the last snapshot."""
    return f"{_ev(event_id)}:journal"


def line_durable(event_id: str) -> str:
    """String: how many of the line's facts are journaled (written with each journal record)."""
    return f"{_ev(event_id)}:durable"


def snapshot(event_id: str) -> str:
    """String: the msgpack snapshot of the event's waiting line."""
    return f"{_ev(event_id)}:snapshot"


# users ----------------------------------------------------------------------------
def user_tickets(user_id: str) -> str:
    """Hash: ticket id -> msgpack ticket record (rebuildable from the event side)."""
    return f"{_u(user_id)}:tickets"


def user_tickets_version(user_id: str) -> str:
    """Counter bumped on every purchase or refund touching the user: the cache stamp."""
    return f"{_u(user_id)}:tickets:ver"


def user_tickets_cache(user_id: str, version: int, variant: str) -> str:
    return f"{_u(user_id)}:tickets:cache:{version}:{variant}"


def rate(user_id: str, action: str, window: int) -> str:
    return f"{_u(user_id)}:rate:{action}:{window}"


def purchase_owner(purchase_id: str) -> str:
    """String: which event a purchase id belongs to (lookup for GET /api/purchases/{pid})."""
    return f"{PREFIX}:pid:{purchase_id}"


# purchase streams -----------------------------------------------------------------
def purchase_stream(partition: int) -> str:
    return f"{PREFIX}:{{ps:{partition}}}:purchases"


def dead_letter_stream(partition: int) -> str:
    return f"{PREFIX}:{{ps:{partition}}}:dead"


def purchase_errors(partition: int) -> str:
    """Hash: stream entry id -> the last error processing it (read when dead-lettering)."""
    return f"{PREFIX}:{{ps:{partition}}}:errors"


PURCHASE_GROUP = "purchase-job"

# pub/sub channels -----------------------------------------------------------------
EVENT_CHANNEL = f"{PREFIX}:chan:events"  # event id whose details/availability changed
PURCHASE_CHANNEL = f"{PREFIX}:chan:purchases"  # msgpack purchase outcome
