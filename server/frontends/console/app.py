"""The console's routes: its static files, and ``settings.json`` for what the page cannot learn from the APIs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.frontends.restrictions import Restrictions

STATIC_DIR = Path(__file__).resolve().parent / "static"


class ConsoleSettings(BaseModel):
    """What the page is told at start: enough to show or hide controls, nothing secret.

    Header names of restricted groups are already in every refusal's message (Triton's wording), so sending them
    lets the page ask for exactly the values it needs; the values stay on the server.
    """

    model_control_mode: str
    # API group (Triton's name) -> the header it needs.
    restricted: dict[str, str]
    openai_key_required: bool
    # The ``/v1`` routes this server has, so the playground offers audio or images only where they exist.
    openai_routes: list[str]


def console_app(settings: Callable[[], ConsoleSettings]) -> Starlette:
    """The application mounted at ``/console``: the page, its assets under ``static/``, and ``settings.json``
    (``settings`` is asked on each request, so the console reads the server as it is, not as it was built)."""

    async def index(_: Request) -> Response:
        # Revalidated on every load, so an upgraded server never runs an old page against new APIs.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def settings_json(_: Request) -> Response:
        body = settings().model_dump_json()
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/settings.json", settings_json),
            Mount("/static", StaticFiles(directory=STATIC_DIR)),
        ]
    )


def restricted_headers(restrictions: Restrictions) -> dict[str, str]:
    """Each restricted API group's header name, keyed by the group's Triton name."""
    return {group.value: header.name for group, header in restrictions.required.items()}


def console_redirect(_: Request) -> Response:
    """``/console`` without the slash: the page's relative links need the slash."""
    return RedirectResponse("/console/", status_code=307)
