"""Tokens and bodies that must be refused, and what must never leak."""

from __future__ import annotations

import secrets
import time

import jwt
import pytest

from eventpulse.auth import mint_token


@pytest.fixture
def forged(test_secret):
    now = time.time()
    return {
        "bad signature": mint_token("mallory", ["admin"], secret=secrets.token_urlsafe(32)),
        "alg none": jwt.encode({"sub": "mallory", "roles": ["admin"], "exp": now + 60},
                               key=None, algorithm="none"),
        "expired": mint_token("mallory", [], secret=test_secret, ttl_s=60, now=now - 3600),
        "not yet valid": jwt.encode({"sub": "mallory", "exp": now + 7200, "nbf": now + 3600},
                                    test_secret, algorithm="HS256"),
        "no sub": jwt.encode({"exp": now + 60}, test_secret, algorithm="HS256"),
        "garbage": "abc.def.ghi",
    }


async def test_forged_expired_and_malformed_tokens_are_401(http, forged):
    for name, token in forged.items():
        async with http.get("/api/events", headers={"Authorization": f"Bearer {token}"}) as r:
            body = await r.json()
            assert r.status == 401, name
            assert body["error"]["code"] == "unauthorized", name
            assert "secret" not in body["error"]["message"].lower()


async def test_oversized_body_is_413(http, auth_headers):
    big = b'{"name": "' + b"x" * 200_000 + b'"}'
    async with http.post("/api/events", data=big, headers={
            **auth_headers("org", "organizer"), "Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "payload_too_large"


async def test_chunked_oversized_body_is_413(http, auth_headers):
    async def gen():
        for _ in range(100):
            yield b"x" * 4096

    async with http.post("/api/events", data=gen(), headers={
            **auth_headers("org", "organizer"), "Content-Type": "application/json"}) as r:
        assert r.status == 413


async def test_unknown_route_and_wrong_method_use_the_envelope(http, auth_headers):
    async with http.get("/api/nothing-here", headers=auth_headers("u")) as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.put("/api/events", headers=auth_headers("u")) as r:
        assert r.status == 405 and "error" in await r.json()


def test_production_mode_refuses_to_start_without_a_secret():
    from pydantic import ValidationError

    from eventpulse.settings import Settings

    with pytest.raises(ValidationError, match="EVENTPULSE_TOKEN_SECRET"):
        Settings(_env_file=None, mode="production", token_secret=None)
