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


def _signed(header: dict, claims: dict, secret: str) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=header)


def _raw(header: dict, claims: dict, secret: str) -> str:
    """An HS256 token made by hand, for headers PyJWT will not write."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    return (signing + b"." + b64(hmac.new(secret.encode(), signing, hashlib.sha256).digest())
            ).decode()


def test_a_token_taken_on_haproxys_word_is_one_pyjwt_accepts_too():
    """`vouched_principal` reads the claims of a token whose signature HAProxy checked. It
    may hand any token to PyJWT (None), but must never accept one PyJWT refuses, and for
    a token both accept it names the same caller."""
    from eventpulse.auth import Unauthorized, verify_token, vouched_principal

    secret = secrets.token_urlsafe(32)
    now = int(time.time())
    plain = {"sub": "ann", "roles": ["organizer", "nope"], "iat": now, "nbf": now,
             "exp": now + 600}
    cases = {
        "as minted": mint_token("ann", ["admin"], secret=secret),
        "plain": _signed({}, plain, secret),
        "with kid": _signed({"kid": "k1"}, plain, secret),
        "no roles, no iat, no nbf": _signed({}, {"sub": "ann", "exp": now + 600}, secret),
    }
    for n in range(-8, 9):  # each side of every time limit, a second at a time
        cases[f"exp now{n:+d}"] = _signed({}, {**plain, "exp": now + n}, secret)
        cases[f"nbf now{n:+d}"] = _signed({}, {**plain, "nbf": now + n}, secret)
        cases[f"iat now{n:+d}"] = _signed({}, {**plain, "iat": now + n}, secret)
    for name, claims in {
        "no exp": {"sub": "ann"}, "no sub": {"exp": now + 600}, "empty sub": {**plain, "sub": ""},
        "long sub": {**plain, "sub": "a" * 129}, "sub not str": {**plain, "sub": 7},
        "roles not list": {**plain, "roles": "admin"}, "exp str": {**plain, "exp": str(now + 600)},
        "exp float": {**plain, "exp": now + 600.5}, "exp bool": {**plain, "exp": True},
        "audience": {**plain, "aud": "someone"}, "issuer": {**plain, "iss": "x"},
        "jti int": {**plain, "jti": 5},
    }.items():
        cases[name] = _signed({}, claims, secret)
    cases["crit header"] = _raw({"alg": "HS256", "crit": ["exp"]}, plain, secret)
    cases["kid not str"] = _raw({"alg": "HS256", "kid": 5}, plain, secret)
    cases["by hand"] = _raw({"alg": "HS256", "typ": "JWT"}, plain, secret)
    cases["header not an object"] = _raw(["HS256"], plain, secret)
    cases["claims not an object"] = _raw({"alg": "HS256"}, ["ann"], secret)
    cases["alg none"] = jwt.encode(plain, key=None, algorithm="none")
    cases["garbage"] = "abc.def.ghi"
    cases["two parts"] = "abc.def"
    taken = 0
    for name, token in cases.items():
        fast = vouched_principal(token, time.time())
        try:
            slow = verify_token(token, secret=secret)
        except Unauthorized:
            slow = None
        if fast is not None:
            taken += 1
            assert slow == fast, name
    # the plain shapes are taken, so the side server's requests really skip PyJWT
    assert all(vouched_principal(cases[k]) is not None
               for k in ("as minted", "plain", "with kid", "no roles, no iat, no nbf", "by hand"))
    assert vouched_principal(cases["as minted"]).roles == frozenset({"admin"})
    assert taken > 10


def test_haproxy_tells_the_lane_which_tokens_it_verified_and_no_client_can(tmp_path):
    """The real HAProxy on the edited config, its side server a small server that shows what it
    received: a valid token arrives with the signature HAProxy checked and the proof; a
    token signed with another secret, or headers a client made up, arrive without."""
    import asyncio
    import os
    import signal
    import subprocess

    from aiohttp import ClientConnectionError, ClientSession, web

    from cluster.haproxy import PROOF_ENV, SECRET_ENV, edit, haproxy_binary
    from eventpulse.auth import edge_proof
    from tests.conftest import free_port
    from tests.test_haproxy_edge import SERVE_SHAPED

    secret = secrets.token_urlsafe(32)
    side_port, port = free_port(), free_port()
    seen: list[dict[str, str]] = []

    async def side(request: web.Request) -> web.Response:
        if request.path != "/healthz":
            seen.append({k.lower(): v for k, v in request.headers.items()
                         if k.lower().startswith("x-ep-")})
        return web.json_response({"ok": True})

    (tmp_path / "500.http").write_bytes(b"HTTP/1.1 500 x\r\nContent-Length: 0\r\n\r\n")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(edit(SERVE_SHAPED.format(serve_500=tmp_path / "500.http", port=port),
                        unavailable=tmp_path / "500.http", edge=True, side_port=side_port))
    env = {"PATH": "/usr/bin:/bin", SECRET_ENV: secret, PROOF_ENV: edge_proof(secret)}

    async def run(proc: subprocess.Popen) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", side)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", side_port).start()
        try:
            good = mint_token("ann", secret=secret)
            bad = mint_token("mallory", ["admin"], secret=secrets.token_urlsafe(32))
            made_up = {"X-EP-Verified": bad.rsplit(".", 1)[1], "X-EP-Proof": edge_proof(secret)}
            url = f"http://127.0.0.1:{port}/api/events/e1/queue/me"
            async with ClientSession() as s:
                for _ in range(100):  # until HAProxy's health check sees the side server up
                    assert proc.poll() is None, "HAProxy refused the edited config"
                    try:
                        async with s.get(url) as r:
                            if r.status == 200:
                                break
                    except ClientConnectionError:  # not listening yet
                        pass
                    await asyncio.sleep(0.1)
                seen.clear()
                for token, extra in ((good, {}), (bad, {}), (bad, made_up), (None, made_up),
                                     (good, {"X-EP-Verified": "x", "X-EP-Proof": "y"})):
                    auth = {"Authorization": f"Bearer {token}"} if token else {}
                    async with s.get(url, headers={**auth, **extra}) as r:
                        assert r.status == 200
        finally:
            await runner.cleanup()

    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(run(proc))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    vouched = {"x-ep-verified": mint_token("ann", secret=secret).rsplit(".", 1)[1],
               "x-ep-proof": edge_proof(secret)}
    assert seen[0].keys() == vouched.keys() and seen[0]["x-ep-proof"] == vouched["x-ep-proof"]
    assert seen[1:4] == [{}, {}, {}]
    assert seen[4]["x-ep-proof"] == vouched["x-ep-proof"] and seen[4]["x-ep-verified"] != "x"
    assert os.environ.get(SECRET_ENV) is None  # the secret went to HAProxy's env only
