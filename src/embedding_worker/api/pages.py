"""The pages for people: interactive API docs at /docs (Swagger UI over /v1/openapi.json) and a
playground at / for a browser (a GET that accepts text/html). Everything they load is served from
here: Swagger UI's files from the `swagger-ui-py` package, the playground's from `page/` beside
this module; no CDN. A file is read when first asked for and kept; nothing runs at start-up or on
an API request. With API_KEY set they need the key like any route unless PUBLIC_PAGES says they
are public (then so is the OpenAPI document they read); their calls send the key the user gives
the page, which the server never keeps."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from ..core.errors import NotFound

PAGE = Path(__file__).with_name("page")
# the playground's files and Swagger UI's that /docs loads: nothing else is served
PLAYGROUND_FILES = ("playground.js", "playground.css")
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png"}
# a day in a browser's cache; the names carry no version, so not longer
CACHE = {"Cache-Control": "public, max-age=86400"}

DOCS = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>infinity-embedding-worker: API docs</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
<style>body { margin: 0 } .topbar-note { font: 14px sans-serif; padding: 8px 20px;
background: #1b1b1b; color: #ddd } .topbar-note a { color: #8fd }</style>
</head>
<body>
<div class="topbar-note">infinity-embedding-worker: every route of every dialect.
"Authorize" takes the API key when the server has one. <a href="/">Playground</a></div>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/v1/openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, displayRequestDuration: true, tryItOutEnabled: false,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});
</script>
</body>
</html>
"""


def is_page(method: str, path: str) -> bool:
    """What PUBLIC_PAGES opens: the pages, their files and the OpenAPI document they read."""
    return method in ("GET", "HEAD") and (
        path in ("/", "/docs", "/v1/openapi.json") or path.startswith(("/docs/", "/playground/")))


@cache
def swagger_dir() -> Path:
    """Swagger UI's files in the swagger-ui-py package, found without importing it (its import
    pulls in Jinja and its framework handlers)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("the API docs need the swagger-ui-py package: pip install swagger-ui-py")
    return Path(list(spec.submodule_search_locations)[0]) / "static"


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


def _file(directory: Path, name: str, allowed: tuple[str, ...]) -> Response:
    if name not in allowed:
        raise NotFound(f"no file {name!r}")
    return Response(_read(directory / name), media_type=TYPES[Path(name).suffix], headers=CACHE)


async def docs(_request: Request) -> Response:
    return HTMLResponse(DOCS)


async def docs_file(request: Request) -> Response:
    return _file(swagger_dir(), request.path_params["name"], SWAGGER_FILES)


async def playground_file(request: Request) -> Response:
    return _file(PAGE, request.path_params["name"], PLAYGROUND_FILES)


async def root(request: Request) -> Response:
    """The playground for a browser; any other GET / keeps its answer (TEI's / takes POST), made
    where every 405 is (api/http.py)."""
    if "text/html" not in request.headers.get("accept", ""):
        raise HTTPException(405, headers={"Allow": "POST"})
    return HTMLResponse(_read(PAGE / "index.html"))


def routes() -> list[BaseRoute]:
    return [Route("/docs", docs, methods=["GET"]),
            Route("/docs/{name}", docs_file, methods=["GET"]),
            Route("/playground/{name}", playground_file, methods=["GET"]),
            Route("/", root, methods=["GET"])]
