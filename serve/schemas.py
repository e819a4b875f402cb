"""Request and response bodies of the HTTP API (pydantic; snake_case fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eventpulse.ledger import TOTAL

Strict = ConfigDict(extra="forbid")
NAME = Field(min_length=1, max_length=200)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class TicketTypeIn(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.-]+$")
    price: float = Field(ge=0, le=1_000_000)
    quantity: int = Field(ge=1, le=10_000_000)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == TOTAL:  # the ledger's counters keep the event's total under this field
            raise ValueError(f"{TOTAL!r} is reserved")
        return v


class EventIn(BaseModel):
    model_config = Strict
    name: str = NAME
    description: str = Field("", max_length=5000)
    location: str = Field("", max_length=500)
    event_date: datetime
    price: float = Field(ge=0, le=1_000_000)
    total_tickets: int = Field(ge=1, le=10_000_000)
    max_per_user: int = Field(4, ge=1, le=50)
    offer_minutes: float = Field(30, gt=0, le=24 * 60)
    sale_opens_at: datetime | None = None
    ticket_types: list[TicketTypeIn] | None = Field(None, min_length=1, max_length=50)

    @field_validator("ticket_types")
    @classmethod
    def _unique_names(cls, v: list[TicketTypeIn] | None) -> list[TicketTypeIn] | None:
        if v is not None and len({t.name for t in v}) != len(v):
            raise ValueError("ticket type names must be unique")
        return v

    @model_validator(mode="after")
    def _types_fit_total(self) -> "EventIn":
        if self.ticket_types and sum(t.quantity for t in self.ticket_types) != self.total_tickets:
            raise ValueError("ticket type quantities must add up to total_tickets")
        return self


class TicketTypeOut(BaseModel):
    name: str
    price: float
    quantity: int


class EventOut(BaseModel):
    id: str
    name: str
    description: str
    location: str
    event_date: str
    price: float
    total_tickets: int
    max_per_user: int
    offer_minutes: float
    sale_opens_at: str | None = None
    ticket_types: list[TicketTypeOut]
    organizer_id: str | None = None  # events seeded straight into Redis may have none
    state: str
    created_at: float


class EventPage(BaseModel):
    items: list[EventOut]
    total: int
    offset: int
    limit: int


class Availability(BaseModel):
    event_id: str
    total: int
    sold: int
    held: int
    remaining: int
    sold_out: bool
    by_type: dict[str, dict[str, int]] | None = None


class JoinIn(BaseModel):
    model_config = Strict
    quantity: int = Field(1, ge=1, le=50)
    ticket_type: str | None = Field(None, min_length=1, max_length=64)


class Offer(BaseModel):
    quantity: int
    expires_at: float


class Entry(BaseModel):
    event_id: str
    user_id: str
    status: Literal["waiting", "offered", "purchasing", "purchased", "expired", "left",
                    "released", "abandoned", "sold_out", "cancelled"]
    position: int | None
    eta_seconds: float | None
    quantity: int
    ticket_type: str | None
    lane: int | None = None
    offer: Offer | None
    joined_at: float | None = None


class PurchaseIn(BaseModel):
    model_config = Strict
    quantity: int = Field(ge=1, le=50)
    payment_reference: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")


class Ticket(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    event_id: str | None = None
    ticket_type: str | None = None
    user_id: str | None = None
    status: str | None = None
    amount: float | None = None
    payment_reference: str | None = None
    purchase_id: str | None = None
    purchased_at: float | None = None
    event: dict | None = None


class Purchase(BaseModel):
    purchase_id: str
    event_id: str
    status: Literal["accepted", "committed", "declined", "rejected", "failed"]
    quantity: int
    reason: str | None = None
    tickets: list[Ticket] = []
    status_url: str


class QueueSettingsIn(BaseModel):
    model_config = Strict
    paused: bool | None = None
    offers_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    max_live_offers: int | None = Field(None, ge=1, le=10_000_000)
    abandon_after_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)
    unlimited_outflow: bool | None = None


class CancelOut(BaseModel):
    event_id: str
    state: str
    refunded_tickets: int
