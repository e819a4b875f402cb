"""Property-based tests of the whole HTTP API from its own OpenAPI document.

Schemathesis reads `/openapi.json` from the deployed app (real Ray Serve, real Redis) and
sends generated requests — valid and invalid ones — to every documented operation over
real HTTP. Every answer must be a documented status with the documented content type and
body schema, and never a 5xx other than a documented 503.

Two runs: one as an admin (so authorization passes broadly and the handlers' own
validation is exercised), one with forged or broken tokens (every protected operation
must answer 401). Path parameters sometimes name real records (an event with a queue,
a committed purchase, its ticket and buyer) so the success paths are checked too.

Not exercised here: the SSE stream on an event where the caller has an entry (it never
ends; `test_api_queue.py` covers it), and `?wait=` on purchases is capped at 2 s.
"""

from __future__ import annotations

import time

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                response_schema_conformance,
                                                status_code_conformance)

from tests.conftest import EVENT_BODY, unique

pytestmark = pytest.mark.usefixtures("purchase_job")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_EXAMPLES = 25
REQUEST_TIMEOUT_S = 30
UNPROTECTED = {"/healthz", "/readyz"}
STREAM = "/api/events/{event_id}/queue/me/stream"


def _seed(serve_url: str, auth_headers) -> dict[str, str]:
    """Real records for path parameters: an event with a line, a committed purchase."""
    org = auth_headers("organizer-1", "organizer")
    buyer, waiter = unique("buyer"), unique("waiter")
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        r = c.post("/api/events", json={**EVENT_BODY, "total_tickets": 3}, headers=org)
        assert r.status_code == 201, r.text
        event_id = r.json()["id"]
        for u in (buyer, waiter):
            r = c.post(f"/api/events/{event_id}/queue", json={"quantity": 1},
                       headers=auth_headers(u))
            assert r.status_code == 200, r.text
        r = c.post(f"/api/events/{event_id}/purchases?wait=20",
                   json={"quantity": 1, "payment_reference": "test_ok_schemathesis"},
                   headers={**auth_headers(buyer), "Idempotency-Key": "seed-" + buyer})
        assert r.status_code in (201, 202), r.text
        pid = r.json()["purchase_id"]
        deadline = time.monotonic() + 60
        while True:
            body = c.get(f"/api/purchases/{pid}", headers=auth_headers(buyer)).json()
            if body["status"] == "committed":
                break
            assert time.monotonic() < deadline, f"purchase {pid} never committed: {body}"
            time.sleep(0.2)
    return {"event_id": event_id, "purchase_id": pid, "ticket_id": body["tickets"][0]["id"],
            "user_id": buyer}


@pytest.fixture(scope="session")
def api_schema(serve_url, auth_headers):
    real = _seed(serve_url, auth_headers)
    schema = schemathesis.openapi.from_url(serve_url + "/openapi.json", timeout=30)
    schema.config.update(base_url=serve_url, request_timeout=REQUEST_TIMEOUT_S)
    schema.config.generation.update(max_examples=MAX_EXAMPLES,
                                    modes=["positive", "negative"])

    @schema.hook
    def flatmap_path_parameters(ctx, path_parameters):
        # Half the time a path parameter names a real record (never on the SSE route:
        # a stream the caller has an entry in stays open for good).
        names = [n for n in path_parameters if n in real]
        if not names or ctx.operation.path == STREAM:
            return st.just(path_parameters)
        return st.sampled_from([path_parameters,
                                {**path_parameters, **{n: real[n] for n in names}}])

    @schema.hook
    def map_query(ctx, query):
        # `?wait=` may hold a purchase request for up to 30 s: keep the run short.
        if query and isinstance(query.get("wait"), (int, float)) and query["wait"] > 2:
            query = {**query, "wait": 2}
        return query

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@schema.parametrize()
@hypothesis.settings(deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema_as_admin(case, session, token_for):
    """Admin token: no 5xx (bar documented 503s), every answer documented and well-formed."""
    response = case.call_and_validate(
        session=session, headers={"Authorization": f"Bearer {token_for('admin-fuzz', 'admin')}"},
        checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code != 503, response.text  # overload here would be a bug
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}, response.text


def _forged_tokens(test_secret: str) -> list[str]:
    import base64
    import json

    import jwt

    now = int(time.time())
    claims = {"sub": "admin-fuzz", "roles": ["admin"], "iat": now, "exp": now + 3600}

    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return [
        jwt.encode(claims, "not-the-secret-" + "x" * 32, algorithm="HS256"),  # wrong key
        f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",  # unsigned
        jwt.encode({**claims, "exp": now - 3600}, test_secret, algorithm="HS256"),  # expired
        jwt.encode({"roles": ["admin"], "exp": now + 3600}, test_secret, algorithm="HS256"),
        "not.a.jwt",
        "",
    ]


@schema.parametrize()
@given(which=st.integers(min_value=0, max_value=5))
@hypothesis.settings(deadline=None, derandomize=True, max_examples=MAX_EXAMPLES,
                     suppress_health_check=list(HealthCheck))
def test_forged_tokens_are_refused_everywhere(case, which, session, test_secret):
    """Forged, unsigned, expired or claimless tokens: 401 on every protected operation."""
    token = _forged_tokens(test_secret)[which]
    case.query = {k: v for k, v in (case.query or {}).items() if k != "access_token"} or None
    response = case.call_and_validate(session=session,
                                      headers={"Authorization": f"Bearer {token}"},
                                      checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
    if case.operation.path not in UNPROTECTED:
        # The body-size guard answers before authentication; nothing else may.
        assert response.status_code in (401, 413), (response.status_code, response.text)
