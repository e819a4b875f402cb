"""`Guard`: the admission layer (`serve/admission.py`) as pure ASGI middleware, outermost
on the FastAPI app, so Serve's request path is bounded and counted as the side server is."""

from __future__ import annotations

from serve.admission import Admission

# A scope key of requests the side server admitted and hands to the app in process
# (`serve.side.in_process`): admitted once, counted once.
ADMITTED = "eventpulse.admitted"


def replay(body: bytes):
    """An ASGI `receive` that hands over a body already read, once, then a disconnect."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _chunks(receive):
    """`Admission.body`'s reader over an ASGI `receive`: each body chunk, then None."""
    more = True

    async def read() -> bytes | None:
        nonlocal more
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            more = msg.get("more_body", False)
            chunk = msg.get("body", b"")
            if chunk:
                return chunk
        return None

    return read


class Guard:
    """Admits each HTTP request (`Admission`) before the app sees it: the body is read whole
    first, under its bound and deadline, and handed on with `replay`."""

    def __init__(self, app, admission: Admission | None = None) -> None:
        self.app = app
        self._admission = admission

    @property
    def admission(self) -> Admission:
        if self._admission is None:  # made in the replica, where the runtime lives
            from serve.runtime import get_runtime

            rt = get_runtime()
            self._admission = Admission(rt, rt.settings)
        return self._admission

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get(ADMITTED):
            return await self.app(scope, receive, send)
        admission = self.admission
        path, method = scope["path"], scope["method"]
        stream = path.endswith("/stream")
        length = dict(scope.get("headers") or ()).get(b"content-length")
        refusal = admission.refusal(path, stream, length)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if method in ("POST", "PUT", "PATCH"):
            body = await admission.body(_chunks(receive))
            if not isinstance(body, bytes):
                return await body(scope, receive, send)
            receive = replay(body)
        admitted = admission.admit("unmatched", method, stream=stream)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                admitted.status = message["status"]
            await send(message)

        with admitted:
            try:
                await self.app(scope, receive, send_counted)
            finally:
                admitted.route = getattr(scope.get("route"), "path", "unmatched")
