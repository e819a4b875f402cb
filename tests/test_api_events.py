"""Events over real HTTP: create, list, details (ETag), availability, and their errors."""

from __future__ import annotations

from tests.conftest import EVENT_BODY


async def test_organizer_creates_event_and_anyone_signed_in_reads_it(http, auth_headers, make_event):
    event = await make_event(name="Create Me", total_tickets=7)
    assert event["total_tickets"] == 7 and event["ticket_types"][0]["name"] == "general"
    async with http.get(f"/api/events/{event['id']}", headers=auth_headers("reader")) as r:
        assert r.status == 200
        body = await r.json()
        assert body["name"] == "Create Me" and body["id"] == event["id"]
        etag = r.headers["ETag"]
        assert "max-age" in r.headers["Cache-Control"]
    async with http.get(f"/api/events/{event['id']}",
                        headers={**auth_headers("reader"), "If-None-Match": etag}) as r:
        assert r.status == 304


async def test_event_creation_with_an_idempotency_key_creates_once(http, auth_headers, redis):
    """A repeated create (a client's retry, or the ingress replaying a request whose
    replica died) answers the first event; the same key with another body is refused."""
    import uuid

    from eventpulse import keys

    org, key = auth_headers("org-idem", "organizer"), uuid.uuid4().hex
    body = {**EVENT_BODY, "name": "Once Only"}
    ids = []
    for _ in range(2):
        async with http.post("/api/events", json=body, headers={**org, "Idempotency-Key": key}) as r:
            assert r.status == 201, await r.text()
            ids.append((await r.json())["id"])
    assert ids[0] == ids[1] and await redis.exists(keys.event(ids[0]))
    async with http.post("/api/events", json={**body, "total_tickets": 9},
                         headers={**org, "Idempotency-Key": key}) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "idempotency_key_reused"
    other = auth_headers("org-idem-2", "organizer")  # keys are per organizer
    async with http.post("/api/events", json=body, headers={**other, "Idempotency-Key": key}) as r:
        assert r.status == 201 and (await r.json())["id"] != ids[0]
    async with http.post("/api/events", json=body, headers={**org, "Idempotency-Key": "short"}) as r:
        assert r.status == 422


async def test_the_app_runs_on_the_configured_redis(http, make_event, redis_server):
    """With EVENTPULSE_TEST_REDIS=cluster the deployed app itself talks to the 3-master
    cluster (its readiness says so, and the event's keys live on the slot's master)."""
    from tests.conftest import CLUSTER

    async with http.get("/readyz") as r:
        assert r.status == 200
        assert (await r.json())["redis_pool"]["nodes"] == (3 if CLUSTER else 1)
    event = await make_event()
    if CLUSTER:
        from eventpulse import keys

        owners = [port for port in redis_server.ports
                  if redis_server._cli(port, "EXISTS", keys.event(event["id"])).strip() == "1"]
        assert len(owners) == 1  # exactly one master holds it: the cluster, not a copy


async def test_plain_user_cannot_create_events(http, auth_headers):
    async with http.post("/api/events", json=EVENT_BODY, headers=auth_headers("someone")) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "forbidden"


async def test_missing_token_is_401_in_the_envelope(http):
    async with http.get("/api/events") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "unauthorized"


async def test_invalid_and_malformed_bodies_are_4xx_with_clear_messages(http, auth_headers):
    org = auth_headers("org", "organizer")
    async with http.post("/api/events", json={**EVENT_BODY, "total_tickets": -1}, headers=org) as r:
        assert r.status == 422
        assert "total_tickets" in (await r.json())["error"]["message"]
    async with http.post("/api/events", json={**EVENT_BODY, "surprise": 1}, headers=org) as r:
        assert r.status == 422
    async with http.post("/api/events", data=b"{not json", headers={
            **org, "Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "malformed_json"
    types = [{"name": "vip", "price": 100, "quantity": 2}, {"name": "floor", "price": 50, "quantity": 2}]
    async with http.post("/api/events", json={**EVENT_BODY, "ticket_types": types}, headers=org) as r:
        assert r.status == 422  # 4 != total_tickets 10
    # The ledger keeps an event's total beside its types' counts: that name is taken.
    types = [{"name": "_total", "price": 1, "quantity": 10}]
    async with http.post("/api/events", json={**EVENT_BODY, "ticket_types": types}, headers=org) as r:
        assert r.status == 422
        assert "reserved" in (await r.json())["error"]["message"]


async def test_event_with_ticket_types_and_list_pagination(http, auth_headers, make_event):
    types = [{"name": "vip", "price": 100, "quantity": 3}, {"name": "floor", "price": 50, "quantity": 7}]
    event = await make_event(ticket_types=types)
    assert [t["name"] for t in event["ticket_types"]] == ["vip", "floor"]
    async with http.get("/api/events?limit=2&offset=0", headers=auth_headers("reader")) as r:
        page = await r.json()
        assert r.status == 200 and len(page["items"]) <= 2 and page["total"] >= 1
    async with http.get("/api/events?limit=1000", headers=auth_headers("reader")) as r:
        assert r.status == 422


async def test_availability_and_unknown_event(http, auth_headers, make_event):
    event = await make_event(total_tickets=5)
    async with http.get(f"/api/events/{event['id']}/availability", headers=auth_headers("r")) as r:
        assert r.status == 200
        body = await r.json()
        assert {k: body[k] for k in ("event_id", "total", "sold", "held", "remaining", "sold_out")
                } == {"event_id": event["id"], "total": 5, "sold": 0, "held": 0,
                      "remaining": 5, "sold_out": False}
        assert body["by_type"]["general"]["remaining"] == 5
    for bad in ("doesnotexist00", "../../etc", "x" * 300):
        async with http.get(f"/api/events/{bad}", headers=auth_headers("r")) as r:
            assert r.status == 404
            assert "error" in await r.json()


async def test_health_and_readiness(http):
    async with http.get("/healthz") as r:
        assert r.status == 200
    async with http.get("/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["redis"] is True and body["redis_pool"]["max"] >= 1


async def test_openapi_documents_every_route(http):
    async with http.get("/openapi.json") as r:
        paths = (await r.json())["paths"]
    for path in ("/api/events", "/api/events/{event_id}", "/api/events/{event_id}/availability",
                 "/api/events/{event_id}/queue", "/api/events/{event_id}/queue/me",
                 "/api/events/{event_id}/queue/me/stream", "/api/events/{event_id}/queue/me/release",
                 "/api/events/{event_id}/purchases", "/api/purchases/{purchase_id}",
                 "/api/users/{user_id}/tickets", "/api/queue/position",
                 "/api/admin/events/{event_id}/queue", "/api/admin/events/{event_id}/cancel"):
        assert path in paths, path
