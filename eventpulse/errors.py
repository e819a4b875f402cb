"""Every error the domain raises, each knowing its HTTP status and stable code.

The Serve app maps these to the JSON error envelope in exactly one place
(`serve/errors.py`); the core raises them without knowing about HTTP.
"""

from __future__ import annotations


class EventPulseError(Exception):
    """Base of the hierarchy. `code` is stable for clients; `status` is the HTTP status."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")
        self.retry_after = retry_after

    def __reduce__(self):  # survive pickling across Ray calls with the keyword intact
        return (_rebuild, (type(self), self.message, self.retry_after))


def _rebuild(cls, message, retry_after):
    return cls(message, retry_after=retry_after)


class InvalidInput(EventPulseError):
    status, code = 422, "invalid_input"


class Unauthorized(EventPulseError):
    status, code = 401, "unauthorized"


class Forbidden(EventPulseError):
    status, code = 403, "forbidden"


class NotFound(EventPulseError):
    status, code = 404, "not_found"


class EventNotFound(NotFound):
    code = "event_not_found"


class EntryNotFound(NotFound):
    code = "entry_not_found"


class Conflict(EventPulseError):
    status, code = 409, "conflict"


class QueueClosed(Conflict):
    code = "queue_closed"


class AlreadyPurchased(Conflict):
    code = "already_purchased"


class SoldOut(Conflict):
    code = "sold_out"


class NoOffer(Conflict):
    code = "no_offer"


class OfferExpired(Conflict):
    code = "offer_expired"


class IdempotencyMismatch(Conflict):
    code = "idempotency_key_reused"


class PaymentDeclined(Conflict):
    status, code = 402, "payment_declined"


class PayloadTooLarge(EventPulseError):
    status, code = 413, "payload_too_large"


class RateLimited(EventPulseError):
    status, code = 429, "rate_limited"


class Busy(EventPulseError):
    """Overloaded or a dependency is down: the client should retry after a pause."""

    status, code = 503, "unavailable"


class DecodeError(EventPulseError):
    """A stored snapshot or journal record cannot be decoded: refuse rather than guess."""

    status, code = 500, "corrupt_state"
