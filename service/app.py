"""The FastAPI application factory. ``uvicorn --factory service.app:create_app`` or ``service.main:app``.

Imports neither torch nor ray (``tests/test_service_imports.py`` checks it in a fresh interpreter).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from igat_core.rundir import RESULTS_FILE
from service import store
from service.db import make_engine, make_session_factory
from service.auth import UI_PREFIX
from service.guard import RequestGuard
from service.settings import Settings, get_settings

DESCRIPTION = f"""
Submit ensemble adversarial-defence experiments (an `ExperimentSpec` as JSON), follow them as server-sent
events, and fetch their `{RESULTS_FILE}`, report and checkpoints.

Mutating routes need `Authorization: Bearer <IGAT_API_TOKEN>`, and so does every read but `/healthz` where the
server runs with `IGAT_OPEN_READS=false` (deployments; the default, true, is for local development). A server
without a token refuses those routes (503). Request bodies are limited to `IGAT_MAX_BODY_BYTES` (413).
"""
#: Problems a 422 lists; it counts the rest (a body with 100,000 unknown keys gets a short answer).
MAX_REPORTED_PROBLEMS = 20


def create_app(settings: Settings | None = None, *, session_factory: sessionmaker[Session] | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = None
    if session_factory is None:
        engine = make_engine(settings.database_url)
        session_factory = make_session_factory(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if engine is not None:
            engine.dispose()

    app = FastAPI(title="igat", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = session_factory
    app.state.engine = engine

    from service.api import DOCUMENTED_MODELS, router

    app.include_router(router)
    _mount_ui(app)
    app.add_middleware(RequestGuard, settings=settings)
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app, DOCUMENTED_MODELS)  # type: ignore[method-assign]
    return app


#: The web UI: static HTML, JavaScript modules and CSS, no build step (service/README.md, "Web UI").
UI_DIR = Path(__file__).resolve().parent / "ui"


def _mount_ui(app: FastAPI) -> None:
    """The UI's files at /ui/ (index.html at /ui/), and / sends a browser there."""
    app.mount(UI_PREFIX, StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def _home() -> RedirectResponse:
        return RedirectResponse(f"{UI_PREFIX}/")


def _openapi(app: FastAPI, models: tuple[type, ...]) -> dict[str, Any]:
    """FastAPI's document plus the JSON schemas of ``models`` (request bodies the routes decode themselves)."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = document
    return app.openapi_schema


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, parts = parts[0], parts[1:]
        if where != "body" and parts:
            return f"{where}.{'.'.join(parts)}"
    return ".".join(parts) or "(root)"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "field": _field(e.get("loc", ())),
             "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors[:MAX_REPORTED_PROBLEMS]
        ]
        omitted = len(errors) - len(problems)
        summary = "; ".join(f"{p['field']}: {p['msg']}" for p in problems)
        more = f" (and {omitted} more)" if omitted else ""
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content=jsonable_encoder({"detail": problems, "message": f"invalid request: {summary}{more}",
                                      "omitted": omitted}),
        )

    @app.exception_handler(store.NotFound)
    async def _not_found(_request: Request, exc: store.NotFound) -> JSONResponse:
        return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"detail": str(exc)})

    @app.exception_handler(store.IllegalTransition)
    async def _conflict(_request: Request, exc: store.IllegalTransition) -> JSONResponse:
        return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": str(exc)})

    @app.exception_handler(store.IdempotencyConflict)
    async def _idempotency(_request: Request, exc: store.IdempotencyConflict) -> JSONResponse:
        return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": str(exc)})

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        # e.g. a NUL character PostgreSQL cannot hold: the request's fault, not the server's
        return JSONResponse(
            status_code=status.HTTP_400_BAD_REQUEST,
            content={"detail": "a value in the request cannot be stored or looked up by the database"},
        )

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"detail": "the database is unavailable or busy; retry shortly"},
            headers={"Retry-After": "2"},
        )
