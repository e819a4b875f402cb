"""The waiting-room page: plain HTML + JS, live over SSE, no build step."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import HTMLResponse

from serve.runtime import get_runtime

router = APIRouter(include_in_schema=False)
_PAGE = files("serve").joinpath("static/waiting_room.html").read_bytes()


@router.get("/events/{event_id}/waiting-room")
async def waiting_room(event_id: str):
    await get_runtime().catalog.event(event_id)  # 404 in the envelope for unknown events
    return HTMLResponse(_PAGE, headers={"Cache-Control": "public, max-age=60"})
