"""The demo data that `eventpulse up --demo` seeds: one event, and a demo user in its line.

Seeding again — every `up --demo` does — reuses what is there: the event whose id is
kept in `<data_dir>/demo.json` while the API still knows it, and the demo user's entry
while it is live. Joins are rate-limited per user (3 in 30 minutes by default), so a
demo that joined on every start broke on the fourth restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx

from eventpulse.auth import mint_token

DEMO_FILE = "demo.json"
DEMO_USER, DEMO_ORGANIZER = "demo-user", "demo-organizer"
DEMO_EVENT = {"name": "Demo Night", "description": "A demo event", "location": "Main Hall",
              "event_date": "2027-06-01T20:00:00Z", "price": 49.0, "total_tickets": 100,
              "max_per_user": 4}
LIVE = ("waiting", "offered", "purchased")


class DemoError(Exception):
    """The API refused a step of the seeding; the message says which and why."""


@dataclass(frozen=True)
class Demo:
    event_id: str
    user_token: str
    organizer_token: str
    joined: bool  # False: the demo user's live entry was kept


def seed(api_url: str, secret: str, data_dir: Path, ttl_s: int) -> Demo:
    """Make sure the demo event exists and the demo user holds a place in its line."""
    org = mint_token(DEMO_ORGANIZER, ["organizer"], secret=secret, ttl_s=ttl_s)
    user = mint_token(DEMO_USER, [], secret=secret, ttl_s=ttl_s)
    kept = data_dir / DEMO_FILE
    with httpx.Client(base_url=api_url, timeout=30) as http:
        event_id = _known_event(http, kept, org)
        if event_id is None:
            # an Idempotency-Key makes a retried create (a lost answer) create it once
            r = http.post("/api/events", json=DEMO_EVENT,
                          headers={"Authorization": f"Bearer {org}",
                                   "Idempotency-Key": "eventpulse-demo-event"})
            event_id = _ok(r, "creating the demo event")["id"]
            kept.write_text(json.dumps({"event_id": event_id}))
        auth = {"Authorization": f"Bearer {user}"}
        me = http.get(f"/api/events/{event_id}/queue/me", headers=auth)
        if me.status_code == 200 and me.json().get("status") in LIVE:
            return Demo(event_id, user, org, joined=False)
        if me.status_code not in (200, 404):
            _ok(me, "reading the demo user's place")
        _ok(http.post(f"/api/events/{event_id}/queue", json={"quantity": 2}, headers=auth),
            "joining the demo user to the line")
    return Demo(event_id, user, org, joined=True)


def _known_event(http: httpx.Client, kept: Path, token: str) -> str | None:
    try:
        event_id = json.loads(kept.read_text())["event_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    r = http.get(f"/api/events/{event_id}", headers={"Authorization": f"Bearer {token}"})
    if r.status_code == 404:
        return None
    _ok(r, "reading the demo event")
    return event_id


def _ok(r: httpx.Response, what: str) -> dict:
    if r.is_success:
        return r.json()
    try:
        detail = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = r.text[:200]
    raise DemoError(f"{what} was answered {r.status_code}: {detail}")
