"""Purchases end to end: accepted by the API, committed by the purchase job, listed fast."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.conftest import replica_stats, unique

pytestmark = pytest.mark.usefixtures("purchase_job")


async def join(http, auth_headers, event_id, user, quantity=1):
    async with http.post(f"/api/events/{event_id}/queue", json={"quantity": quantity},
                         headers=auth_headers(user)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def buy(http, auth_headers, event_id, user, quantity=1, ref="test_ok_1", key=None, wait=10):
    headers = {**auth_headers(user), "Idempotency-Key": key or uuid.uuid4().hex}
    async with http.post(f"/api/events/{event_id}/purchases?wait={wait}", headers=headers,
                         json={"quantity": quantity, "payment_reference": ref}) as r:
        return r.status, await r.json()


async def test_buyer_gets_tickets_and_sees_them_on_the_next_read(http, auth_headers, make_event):
    event = await make_event(total_tickets=5, max_per_user=2)
    u = unique()
    await join(http, auth_headers, event["id"], u, 2)
    async with http.get(f"/api/users/{u}/tickets", headers=auth_headers(u)) as r:
        assert r.status == 200 and await r.json() == []
    status, body = await buy(http, auth_headers, event["id"], u, 2)
    assert status == 201, body
    assert body["status"] == "committed" and len(body["tickets"]) == 2
    async with http.get(f"/api/users/{u}/tickets", headers=auth_headers(u)) as r:
        tickets = await r.json()
        etag = r.headers["ETag"]
    assert {t["id"] for t in tickets} == {t["id"] for t in body["tickets"]}
    assert tickets[0]["event"]["name"] == event["name"] and tickets[0]["status"] == "valid"
    async with http.get(f"/api/users/{u}/tickets", headers={**auth_headers(u), "If-None-Match": etag}) as r:
        assert r.status == 304
    async with http.get(f"/api/users/{u}/tickets?fields=id,status&eventId={event['id']}",
                        headers=auth_headers(u)) as r:
        narrowed = await r.json()
        assert all(set(t) == {"id", "status"} for t in narrowed) and len(narrowed) == 2
    async with http.get(f"/api/users/{u}/tickets?fields=password", headers=auth_headers(u)) as r:
        assert r.status == 422
    async with http.get(f"/api/events/{event['id']}/queue/me", headers=auth_headers(u)) as r:
        assert (await r.json())["status"] == "purchased"
    async with http.get(f"/api/events/{event['id']}/availability", headers=auth_headers(u)) as r:
        avail = await r.json()
        assert avail["sold"] == 2 and avail["held"] == 0


async def test_the_answer_from_the_jobs_outcome_is_the_purchase_as_stored(
        http, auth_headers, make_event):
    """A `?wait=` answer is built from the outcome the job published, not read back; it
    must say exactly what reading the stored purchase says, committed or not."""
    event = await make_event(total_tickets=5, max_per_user=2)
    buyer, declined = unique(), unique()
    await join(http, auth_headers, event["id"], buyer, 2)
    await join(http, auth_headers, event["id"], declined, 1)
    answers = [await buy(http, auth_headers, event["id"], buyer, 2),
               await buy(http, auth_headers, event["id"], declined, ref="test_decline_card")]
    assert answers[0][0] == 201 and len(answers[0][1]["tickets"]) == 2
    assert answers[1][0] == 409
    async with http.get(f"/api/purchases/{answers[0][1]['purchase_id']}",
                        headers=auth_headers(buyer)) as r:
        assert r.status == 200 and await r.json() == answers[0][1]
    # a refusal's envelope names the stored outcome
    pid = answers[1][1]["error"]["message"].split()[1]
    async with http.get(f"/api/purchases/{pid}", headers=auth_headers(declined)) as r:
        stored = await r.json()
    assert (stored["status"], stored["reason"]) == ("declined", "payment_declined")
    assert f"purchase {pid} declined: payment_declined" == answers[1][1]["error"]["message"]


async def test_same_key_same_body_returns_the_same_purchase(http, auth_headers, make_event):
    event = await make_event(total_tickets=3)
    u = unique()
    await join(http, auth_headers, event["id"], u)
    key = uuid.uuid4().hex
    s1, first = await buy(http, auth_headers, event["id"], u, key=key)
    s2, second = await buy(http, auth_headers, event["id"], u, key=key)
    assert s1 == s2 == 201
    assert first["purchase_id"] == second["purchase_id"]
    assert [t["id"] for t in first["tickets"]] == [t["id"] for t in second["tickets"]]
    s3, third = await buy(http, auth_headers, event["id"], u, quantity=1, ref="test_ok_other", key=key)
    assert s3 == 409 and third["error"]["code"] == "idempotency_key_reused"
    async with http.get(f"/api/users/{u}/tickets", headers=auth_headers(u)) as r:
        assert len(await r.json()) == 1


async def test_no_offer_no_purchase(http, auth_headers, make_event):
    event = await make_event(total_tickets=1)
    holder, u = unique(), unique()
    await join(http, auth_headers, event["id"], holder)
    await join(http, auth_headers, event["id"], u)
    status, body = await buy(http, auth_headers, event["id"], u)
    assert status == 409 and body["error"]["code"] == "no_offer"
    async with http.post(f"/api/events/{event['id']}/purchases", json={"quantity": 1,
                         "payment_reference": "test_ok_x"}, headers=auth_headers(holder)) as r:
        assert r.status == 422  # Idempotency-Key is required


async def test_declined_payment_passes_the_hold_to_the_next_person(http, auth_headers, make_event):
    event = await make_event(total_tickets=1)
    a, b = unique(), unique()
    await join(http, auth_headers, event["id"], a)
    await join(http, auth_headers, event["id"], b)
    status, body = await buy(http, auth_headers, event["id"], a, ref="test_decline_card")
    assert status == 409 and body["error"]["code"] == "payment_declined"
    async with http.get(f"/api/events/{event['id']}/queue/me", headers=auth_headers(b)) as r:
        assert (await r.json())["status"] == "offered"
    status, body = await buy(http, auth_headers, event["id"], b)
    assert status == 201


async def test_purchase_status_is_private(http, auth_headers, make_event):
    event = await make_event(total_tickets=2)
    u = unique()
    await join(http, auth_headers, event["id"], u)
    status, body = await buy(http, auth_headers, event["id"], u, wait=0)
    assert status in (201, 202)
    pid = body["purchase_id"]
    for _ in range(50):
        async with http.get(f"/api/purchases/{pid}", headers=auth_headers(u)) as r:
            assert r.status == 200
            if (await r.json())["status"] == "committed":
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("purchase never committed")
    async with http.get(f"/api/purchases/{pid}", headers=auth_headers(unique())) as r:
        assert r.status == 403
    async with http.get(f"/api/users/{u}/tickets", headers=auth_headers(unique())) as r:
        assert r.status == 403
    ticket_id = body["tickets"][0]["id"] if body["tickets"] else f"{pid}-1"
    async with http.get(f"/api/tickets/{ticket_id}", headers=auth_headers(u)) as r:
        assert r.status == 200 and (await r.json())["event"]["id"] == event["id"]
    async with http.get(f"/api/tickets/{ticket_id}", headers=auth_headers(unique())) as r:
        assert r.status == 403


async def test_cancel_refunds_tickets_and_closes_the_line(http, auth_headers, make_event):
    event = await make_event(total_tickets=3)
    u, late = unique(), unique()
    await join(http, auth_headers, event["id"], u)
    assert (await buy(http, auth_headers, event["id"], u))[0] == 201
    async with http.post(f"/api/admin/events/{event['id']}/cancel", headers=auth_headers(u)) as r:
        assert r.status == 403
    async with http.post(f"/api/admin/events/{event['id']}/cancel",
                         headers=auth_headers("organizer-1", "organizer")) as r:
        assert r.status == 200 and (await r.json())["refunded_tickets"] == 1
    async with http.post(f"/api/admin/events/{event['id']}/cancel",
                         headers=auth_headers("organizer-1", "organizer")) as r:
        assert r.status == 200 and (await r.json())["refunded_tickets"] == 0  # idempotent
    async with http.get(f"/api/users/{u}/tickets", headers=auth_headers(u)) as r:
        assert [t["status"] for t in await r.json()] == ["refunded"]
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                         headers=auth_headers(late)) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "queue_closed"


async def test_last_seats_under_concurrency_are_never_oversold(http, auth_headers, make_event, redis):
    from eventpulse import ledger

    event = await make_event(total_tickets=5, max_per_user=1)
    users = [unique() for _ in range(40)]
    await asyncio.gather(*(join(http, auth_headers, event["id"], u) for u in users))

    async def attempt(u):
        return await buy(http, auth_headers, event["id"], u)

    # Everyone tries to buy, offered or not; then the next offers are bought too.
    results = await asyncio.gather(*(attempt(u) for u in users))
    while True:
        pending = []
        for u in users:
            async with http.get(f"/api/events/{event['id']}/queue/me", headers=auth_headers(u)) as r:
                if (await r.json())["status"] == "offered":
                    pending.append(u)
        if not pending:
            break
        results += await asyncio.gather(*(attempt(u) for u in pending))
    sold = await ledger.sold_counts(redis, event["id"])
    assert sold["_total"] == 5
    assert sum(1 for s, _ in results if s == 201) == 5
    assert all(s in (201, 409) for s, _ in results)


async def test_joins_after_the_last_ticket_sold_get_the_lines_own_answers(
        http, auth_headers, make_event, redis):
    """Once the line has sold every ticket the replicas refuse joins without asking it
    (`serve.routes.queue.sold_out_refusal`): every answer is the one the line gave."""
    event = await make_event(total_tickets=1, max_per_user=1)
    eid, buyer = event["id"], unique()
    await join(http, auth_headers, eid, buyer)
    status, body = await buy(http, auth_headers, eid, buyer)
    assert status == 201, body

    async def answers() -> list[tuple[int, dict]]:
        out = []
        for user, req in ((unique(), {"quantity": 1}), (buyer, {"quantity": 1}),
                          (unique(), {"quantity": 1, "ticket_type": "balcony"})):
            async with http.post(f"/api/events/{eid}/queue", json=req,
                                 headers=auth_headers(user)) as r:
                out.append((r.status, await r.json()))
        return out

    expected = await answers()  # the line's: no replica knows yet that it sold out
    assert [(s, b["error"]["code"]) for s, b in expected] == [
        (409, "sold_out"), (409, "already_purchased"), (422, "invalid_input")], expected
    for _ in range(100):  # each replica learns it from the line after refusing a join
        if all(eid in s["sold_out"]["events"] for s in await replica_stats(http, auth_headers)):
            break
        await answers()
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the replicas never learned that the line sold out")
    before = sum(s["sold_out"]["refusals"] for s in await replica_stats(http, auth_headers))
    for _ in range(5):
        assert await answers() == expected
    stats = await replica_stats(http, auth_headers)
    assert sum(s["sold_out"]["refusals"] for s in stats) - before == 15
    # the sold-out event's buyers, final, were read once and kept: its one buyer
    assert all(s["sold_out"]["buyers_kept"].get(eid) == 1 for s in stats), stats

    # A refusal does not count against the join rate limit: a user at the limit is told
    # the event sold out, and their count stays, while another event's line refuses them.
    from eventpulse import keys
    from eventpulse.settings import get_settings

    settings, fan = get_settings(), unique()
    limit_key = keys.rate(fan, "join", int(time.time() // settings.join_rate_window_s))
    await redis.set(limit_key, settings.join_rate_limit, ex=60)
    for _ in range(3):
        async with http.post(f"/api/events/{eid}/queue", json={"quantity": 1},
                             headers=auth_headers(fan)) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (409, "sold_out")
    assert int(await redis.get(limit_key)) == settings.join_rate_limit
    other = await make_event()
    async with http.post(f"/api/events/{other['id']}/queue", json={"quantity": 1},
                         headers=auth_headers(fan)) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (429, "rate_limited")
