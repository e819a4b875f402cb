"""The request metrics' status label: a request whose client went away before any answer
is counted as 499, not 500 (the 5xx alert pages on 500s)."""

from __future__ import annotations

import asyncio

from eventpulse import metrics
from eventpulse.settings import Settings
from serve.admission import Admission
from serve.middleware import Guard
from serve.runtime import get_runtime


def guard(app, max_streams: int = 10) -> Guard:
    rt = get_runtime()
    bounds = Settings(_env_file=None, max_body_bytes=1024, max_in_flight=10,
                      max_streams=max_streams)
    return Guard(app, Admission(rt, bounds))


def http_counts() -> dict[str, float]:
    return {dict(tags)["status"]: n for (key, tags), n in metrics.aggregate._counts.items()
            if key == "http_requests" and dict(tags)["route"] == "unmatched"}


async def _call(app) -> None:
    scope = {"type": "http", "method": "GET", "path": "/nowhere/in/particular",
             "query_string": b"", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    await guard(app)(scope, receive, send)


def test_a_request_cancelled_before_its_answer_counts_as_499_and_a_crash_as_500():
    async def go() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        started = asyncio.Event()

        async def hangs(scope, receive, send):
            started.set()
            await asyncio.sleep(3600)

        async def crashes(scope, receive, send):
            raise RuntimeError("boom")

        async def answers(scope, receive, send):
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        before = http_counts()
        task = asyncio.create_task(_call(hangs))
        await started.wait()
        task.cancel()  # what Serve does when the client's connection closes
        try:
            await task
        except asyncio.CancelledError:
            pass
        cancelled = http_counts()
        try:
            await _call(crashes)
        except RuntimeError:
            pass
        await _call(answers)
        return before, cancelled, http_counts()

    before, cancelled, after = asyncio.run(go())
    assert cancelled.get("499", 0) == before.get("499", 0) + 1
    assert cancelled.get("500", 0) == before.get("500", 0)
    assert after.get("500", 0) == before.get("500", 0) + 1
    assert after.get("204", 0) == before.get("204", 0) + 1


def test_a_stream_past_the_replicas_bound_is_refused_at_once_with_503():
    """Each stream holds an ingress connection; past `max_streams` a stream request is
    answered 503 `streams_full` with Retry-After at once, without reaching the app."""
    import orjson

    async def go() -> tuple[list[dict], bool]:
        reached = False

        async def app(scope, receive, send):
            nonlocal reached
            reached = True

        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/api/events/e1/queue/me/stream",
                 "query_string": b"", "headers": []}
        rt = get_runtime()
        before, rt.sse_open = rt.sse_open, 3
        try:
            await guard(app, max_streams=3)(scope, receive, send)
        finally:
            rt.sse_open = before
        return sent, reached

    sent, reached = asyncio.run(go())
    assert not reached
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"10") in sent[0]["headers"]
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "streams_full"
