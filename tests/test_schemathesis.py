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
ends; `test_api_queue.py` covers it), and `?wait=` on purchases is capped at 2 s. The
admin's one offer is spent buying, so declining an offer (`release`) is only checked on
its refusals (`test_api_queue.py` covers the success).
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter, defaultdict
import warnings

import httpx
import hypothesis
import jwt
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                response_schema_conformance,
                                                status_code_conformance)

from tests.conftest import EVENT_BODY, unique

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_EXAMPLES = 40
ADMIN = "admin-fuzz"
REQUEST_TIMEOUT_S = 30
UNPROTECTED = {"/healthz", "/readyz"}
STREAM = "/api/events/{event_id}/queue/me/stream"
PURCHASES = "/api/events/{event_id}/purchases"
RELEASE = "/api/events/{event_id}/queue/me/release"


def _seed(serve_url: str, auth_headers) -> dict[str, str]:
    """Real records for path parameters: an event with a line, a committed purchase."""
    org = auth_headers("organizer-1", "organizer")
    buyer, waiter = unique("buyer"), unique("waiter")
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        r = c.post("/api/events", json={**EVENT_BODY, "total_tickets": 3}, headers=org)
        assert r.status_code == 201, r.text
        event_id = r.json()["id"]
        for u, role in ((buyer, None), (waiter, None), (ADMIN, "admin")):
            r = c.post(f"/api/events/{event_id}/queue", json={"quantity": 1},
                       headers=auth_headers(u, role))
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
def api_schema(serve_url, auth_headers, purchase_job):
    real = _seed(serve_url, auth_headers)
    schema = schemathesis.openapi.from_url(serve_url + "/openapi.json", timeout=30)
    schema.config.update(base_url=serve_url, request_timeout=REQUEST_TIMEOUT_S)
    # The runs set the Authorization header themselves (valid, or forged on purpose).
    schema.config.generation.update(max_examples=MAX_EXAMPLES, with_security_parameters=False)

    @schema.hook
    def flatmap_path_parameters(ctx, path_parameters):
        # Half the time a path parameter names a real record (never on the SSE route:
        # a stream the caller has an entry in stays open for good).
        names = [n for n in path_parameters or () if n in real]
        if not names or ctx.operation.path == STREAM:
            return st.just(path_parameters)
        return st.sampled_from([path_parameters,
                                {**path_parameters, **{n: real[n] for n in names}}])

    @schema.hook
    def flatmap_query(ctx, query):
        # The earlier product's position route takes its ids in the query.
        if not query or ctx.operation.path != "/api/queue/position":
            return st.just(query)
        return st.sampled_from([query, {**query, "eventId": real["event_id"],
                                        "userId": real["user_id"]}])

    @schema.hook
    def map_query(ctx, query):
        # `?wait=` may hold a purchase request for up to 30 s: keep the run short.
        if query and isinstance(query.get("wait"), (int, float)) and query["wait"] > 2:
            query = {**query, "wait": 2}
        return query

    return schema



class _PlainAdapter(requests.adapters.BaseAdapter):
    """Delegates to requests' HTTPAdapter without being one.

    grafana-client pulls in niquests, whose urllib3-future replaces the `urllib3` package
    at interpreter start; Schemathesis then fails counting the pool's connections
    (`'TrafficPolice' object has no attribute 'keys'`), which it only does for HTTPAdapters.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inner = requests.adapters.HTTPAdapter()

    def send(self, request, **kwargs):
        return self._inner.send(request, **kwargs)

    def close(self) -> None:
        self._inner.close()


def _session() -> requests.Session:
    s = requests.Session()
    s.mount("http://", _PlainAdapter())
    s.mount("https://", _PlainAdapter())
    return s


def _run(schema, *, headers_for, extra_check=None, skip=(), max_examples=MAX_EXAMPLES
         ) -> dict[str, Counter]:
    """Run every operation of `schema` in both generation modes; collect all failures.

    (Schemathesis's own pytest integration, `from_fixture`, does not work with pytest 9,
    so this drives its Hypothesis strategies and checks directly.)
    """
    failures: list[str] = []
    statuses: dict[str, Counter] = defaultdict(Counter)
    ops = [result.ok() for result in schema.get_all_operations()]
    # Buying first, while the admin still holds the offer it was given in `_seed`.
    ops.sort(key=lambda op: op.path != PURCHASES)
    with _session() as session:
        for op in ops:
            if op.path in skip:
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.settings(max_examples=max_examples, deadline=None, derandomize=True,
                                     database=None, phases=[Phase.explicit, Phase.generate],
                                     suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode), data=st.data())
                def check(case, data):
                    headers = headers_for(data)
                    try:
                        response = case.call_and_validate(session=session, headers=headers,
                                                          checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
                        statuses[op.label][response.status_code] += 1
                        if extra_check is not None:
                            extra_check(case, response)
                    except Exception as e:  # noqa: BLE001 — reported with the reproduction
                        raise AssertionError(
                            f"{e}\n  reproduce: {case.as_curl_command(headers=headers)}") from None

                try:
                    check()
                except AssertionError as e:
                    failures.append(f"{op.label} [{mode.value}]: {e}")
                except hypothesis.errors.Unsatisfiable:
                    pass  # e.g. no way to make an operation without inputs invalid
    assert not failures, f"{len(failures)} failing operation(s):\n\n" + "\n\n".join(failures)
    return statuses


def test_api_conforms_to_its_schema_as_admin(api_schema, token_for):
    """Admin token: no 5xx, every answer documented and well-formed, errors enveloped."""
    headers = {"Authorization": f"Bearer {token_for(ADMIN, 'admin')}"}

    def enveloped(case, response):
        assert response.status_code != 503, response.text  # nothing is overloaded here
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text

    statuses = _run(api_schema, headers_for=lambda _: headers, extra_check=enveloped)
    for label, seen in sorted(statuses.items()):
        print(f"{label:50} {dict(sorted(seen.items()))}")
    assert sum(sum(c.values()) for c in statuses.values()) > 500
    # The success paths were reached too, not only refusals.
    never_ok = [label for label, seen in statuses.items()
                if not any(200 <= code < 300 for code in seen)
                and label.split(" ", 1)[1] not in (STREAM, RELEASE)]  # see the docstring
    assert not never_ok, f"never answered 2xx: {never_ok}"


def _forged_tokens(test_secret: str) -> list[str]:
    now = int(time.time())
    claims = {"sub": "admin-fuzz", "roles": ["admin"], "iat": now, "exp": now + 3600}

    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    with warnings.catch_warnings():  # the real secret is short for HS512; that's the point
        warnings.simplefilter("ignore")
        other_alg = jwt.encode(claims, test_secret, algorithm="HS512")
    return [
        jwt.encode(claims, "not-the-secret-" + "x" * 32, algorithm="HS256"),  # wrong key
        f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",  # unsigned
        other_alg,  # the right key with an algorithm the app does not accept
        jwt.encode({**claims, "exp": now - 3600}, test_secret, algorithm="HS256"),  # expired
        jwt.encode({"roles": ["admin"], "exp": now + 3600}, test_secret, algorithm="HS256"),
        "not.a.jwt",
        "",
    ]


def test_forged_tokens_are_refused_everywhere(api_schema, test_secret):
    """Forged, unsigned, expired or claimless tokens: 401 on every protected operation."""
    tokens = _forged_tokens(test_secret)

    def headers_for(data):
        return {"Authorization": "Bearer " + data.draw(st.sampled_from(tokens), label="token")}

    def refused(case, response):
        if case.operation.path not in UNPROTECTED:
            # Only the body-size guard and the JSON parser answer before authentication.
            refused_early = response.status_code == 413 or (
                response.status_code == 400
                and response.json()["error"]["code"] == "malformed_json")
            assert response.status_code == 401 or refused_early, (response.status_code,
                                                                  response.text)

    _run(api_schema, headers_for=headers_for, extra_check=refused, max_examples=20)
