"""Authentication for routes: the bearer token becomes a `Principal`.

Verified tokens are remembered briefly (bounded LRU keyed by the token) so the hot
routes don't pay an HMAC per request; expiry is still honoured.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from eventpulse.auth import (
    VOUCHED_PROOF,
    VOUCHED_SIGNATURE,
    Principal,
    edge_proof,
    token_secret,
    verify_token,
    vouched_principal,
)
from eventpulse.errors import Forbidden, Unauthorized
from eventpulse.settings import get_settings

_bearer = HTTPBearer(auto_error=False, description="HS256 token: `eventpulse token USER`")
_CACHE_SIZE = 50_000
_verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
_secret: str | None = None
_proof: bytes | None = None


def _get_secret() -> str:
    global _secret
    if _secret is None:
        _secret = token_secret(get_settings())
    return _secret


def authenticate(token: str) -> Principal:
    now = time.time()
    hit = _verified.get(token)
    if hit is not None and hit[1] > now:
        return hit[0]
    principal = verify_token(token, secret=_get_secret())
    _verified[token] = (principal, min(principal.expires_at, now + 300))
    if len(_verified) > _CACHE_SIZE:
        _verified.popitem(last=False)
    return principal


def authenticate_vouched(token: str, headers: dict[bytes, bytes]) -> Principal:
    """`authenticate`, taking the node's HAProxy's word for the token's signature when it
    gives it for this very token (`eventpulse.auth.vouched_principal`); the side server's
    requests come through HAProxy, which strips these headers from what clients send."""
    global _proof
    proof, signature = headers.get(VOUCHED_PROOF), headers.get(VOUCHED_SIGNATURE)
    if proof is not None and signature is not None:
        if _proof is None:
            _proof = edge_proof(_get_secret()).encode()
        if hmac.compare_digest(proof, _proof) and token.rpartition(".")[2].encode() == signature:
            p = vouched_principal(token)
            if p is not None:
                return p
    return authenticate(token)


async def principal(request: Request,
                    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                    ) -> Principal:
    """FastAPI dependency: the caller, or 401 in the error envelope.

    Depending on `_bearer` (rather than calling it) documents the bearer scheme in the
    OpenAPI document, so clients and generated tests know every route needs a token.
    """
    token = creds.credentials if creds else request.query_params.get("access_token")
    if not token:
        raise Unauthorized("missing bearer token")
    return authenticate(token)


def require_self(p: Principal, user_id: str) -> None:
    if p.user_id != user_id and not p.is_admin:
        raise Forbidden("you may only act on your own entries and tickets")


def require_organizer(p: Principal, event: dict | None = None) -> None:
    if p.is_admin:
        return
    if not p.is_organizer:
        raise Forbidden("this route needs the organizer or admin role")
    if event is not None and event.get("organizer_id") != p.user_id:
        raise Forbidden("only the event's organizer or an admin may do this")
