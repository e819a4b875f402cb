"""Organizer routes: line stats, steering the outflow, deployment stats; and their authz."""

from __future__ import annotations

from tests.conftest import unique


async def test_organizer_pauses_and_resumes_the_line(http, auth_headers, make_event):
    event = await make_event(total_tickets=5)
    org = auth_headers("organizer-1", "organizer")
    async with http.patch(f"/api/admin/events/{event['id']}/queue", json={"paused": True},
                          headers=org) as r:
        assert r.status == 200 and (await r.json())["paused"] is True
    u = unique()
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                         headers=auth_headers(u)) as r:
        assert (await r.json())["status"] == "waiting"  # paused: no offers
    async with http.patch(f"/api/admin/events/{event['id']}/queue",
                          json={"paused": False, "offers_per_minute": 100, "max_live_offers": 10},
                          headers=org) as r:
        stats = await r.json()
        assert r.status == 200 and stats["paused"] is False
    async with http.get(f"/api/events/{event['id']}/queue/me", headers=auth_headers(u)) as r:
        assert (await r.json())["status"] == "offered"
    async with http.get(f"/api/admin/events/{event['id']}/queue", headers=org) as r:
        stats = await r.json()
        assert r.status == 200 and stats["live_offers"] == 1 and stats["waiting"] == 0


async def test_admin_routes_refuse_users_and_other_organizers(http, auth_headers, make_event):
    event = await make_event()
    for headers in (auth_headers(unique()), auth_headers("organizer-2", "organizer")):
        async with http.get(f"/api/admin/events/{event['id']}/queue", headers=headers) as r:
            assert r.status == 403
        async with http.patch(f"/api/admin/events/{event['id']}/queue", json={"paused": True},
                              headers=headers) as r:
            assert r.status == 403
    async with http.get(f"/api/admin/events/{event['id']}/queue",
                        headers=auth_headers("root", "admin")) as r:
        assert r.status == 200
    async with http.patch(f"/api/admin/events/{event['id']}/queue", json={"paused": "maybe"},
                          headers=auth_headers("root", "admin")) as r:
        assert r.status == 422


async def test_deployment_stats_for_capacity_planning(http, auth_headers):
    async with http.get("/api/admin/stats", headers=auth_headers("root", "admin")) as r:
        stats = await r.json()
        assert r.status == 200
        assert stats["redis_pool"]["max"] >= 1 and "cache" in stats and "requests" in stats
        assert stats["replica"].count(":") == 1  # host:pid, so reports diff one replica's counters
        assert stats["gc"]["thresholds"] == [700, 10, 100]  # fewer full passes (serve/runtime.py)
        assert len(stats["gc"]["collections"]) == 3
    async with http.get("/api/admin/stats", headers=auth_headers(unique())) as r:
        assert r.status == 403
