"""A no-op FastAPI app on Ray Serve: the throughput floor for `bench.compare`.

Deploy it next to the main app under route prefix /noop, e.g. add to the Serve config:

    - name: noop
      route_prefix: /noop
      import_path: bench.noop_app:app

or `serve run bench.noop_app:app --route-prefix /noop` (`serve deploy` for a running
cluster). Then: `python -m bench.compare --floor-url http://127.0.0.1:8000/noop/`.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from ray import serve

api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

_BODY = b'{"ok":true}'


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(api)
class NoOp:
    @api.get("/")
    async def root(self) -> Response:
        return Response(_BODY, media_type="application/json")


app = NoOp.bind()
