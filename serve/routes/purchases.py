"""Purchases: accepted by the intake (`serve/intake.py`), committed by the purchase job
(`cluster/purchase_job.py`); these routes map their answers and errors to HTTP."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request

from eventpulse.auth import Principal
from eventpulse.errors import (AlreadyPurchased, Busy, Conflict, Forbidden, NoOffer,
                               NotFound, OfferExpired, PaymentDeclined, SoldOut)
from eventpulse.payments import verify_webhook
from serve import idempotency, intake
from serve.auth import principal
from serve.catalog import valid_id
from serve.errors import ErrorEnvelope_responses as ERRORS
from serve.errors import error_response
from serve.hotroutes import WAIT_MAX_S
from serve.responses import json
from serve.runtime import get_runtime
from serve.schemas import Purchase, PurchaseIn

router = APIRouter(tags=["purchases"], responses=ERRORS)
User = Annotated[Principal, Depends(principal)]

_REASONS = {"already_purchased": AlreadyPurchased, "sold_out": SoldOut, "payment_declined": PaymentDeclined,
            "offer_expired": OfferExpired, "no_offer": NoOffer}


def _outcome_response(view: dict[str, Any]):
    status = view["status"]
    if status == "committed":
        return json(view, status=201)
    if status == "accepted":
        return json(view, status=202, headers={"Location": view["status_url"]})
    err = _REASONS.get(view.get("reason") or "", Conflict)
    return error_response(409, err.code, f"purchase {view['purchase_id']} {status}: "
                                         f"{view.get('reason')}")


@router.post("/api/events/{event_id}/purchases", status_code=202,
             responses={201: {"model": Purchase, "description": "committed (with ?wait=)"},
                        202: {"model": Purchase, "description": "accepted"}})
async def purchase(event_id: str, body: PurchaseIn, p: User,
                   idempotency_key: Annotated[str, Header(alias="Idempotency-Key",
                                                          pattern=idempotency.KEY_PATTERN)],
                   wait: Annotated[float, Query(ge=0, le=WAIT_MAX_S)] = 0):
    """Buy with a live offer. Same key + same body returns the same purchase.

    With `wait`, the answer waits up to that many seconds for the purchase job: 201 with
    the tickets once committed, 409 if refused, else 202 with where to look.
    """
    return _outcome_response(await intake.purchase(get_runtime(), event_id, p.user_id, body,
                                                   idempotency_key, wait))


@router.get("/api/purchases/{purchase_id}", response_model=Purchase)
async def purchase_status(purchase_id: str, p: User):
    rt = get_runtime()
    found = await intake.status(rt, purchase_id) if valid_id(purchase_id) else None
    if found is None:
        raise NotFound(f"purchase {purchase_id} does not exist")
    event_id, rec = found
    if rec.get("user_id") != p.user_id and not p.is_admin:
        raise Forbidden("this purchase is not yours")
    return json(await intake.purchase_view(rt, event_id, purchase_id, rec))


@router.post("/api/payments/webhook", status_code=204, include_in_schema=False)
async def payment_webhook(request: Request,
                          signature: Annotated[str, Header(alias="X-Signature")] = ""):
    """How a real provider plugs in: an HMAC-SHA256-signed notification of a payment."""
    secret = get_runtime().settings.webhook_secret
    if secret is None:
        raise Busy("no payment provider is configured")
    body = await request.body()
    if not signature or not verify_webhook(secret.get_secret_value(), body, signature):
        from eventpulse.errors import Unauthorized
        raise Unauthorized("bad webhook signature")
    from starlette.responses import Response
    return Response(status_code=204)
