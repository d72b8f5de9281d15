"""The FastAPI application factory. ``uvicorn --factory service.app:create_app`` or ``service.main:app``.

Imports neither torch nor ray (``tests/test_service_imports.py`` checks it in a fresh interpreter).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from igat_core.rundir import RESULTS_FILE
from service import store
from service.db import make_engine, make_session_factory
from service.settings import Settings, get_settings

DESCRIPTION = f"""
Submit ensemble adversarial-defence experiments (an `ExperimentSpec` as JSON), follow them as server-sent
events, and fetch their `{RESULTS_FILE}`, report and checkpoints.

Mutating routes need `Authorization: Bearer <IGAT_API_TOKEN>`; a server without a token refuses them (503).
"""


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

    from service.api import router

    app.include_router(router)
    _install_error_handlers(app)
    return app


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
        problems = [
            {"loc": list(e.get("loc", ())), "field": _field(e.get("loc", ())), "msg": e.get("msg", ""),
             "type": e.get("type", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['msg']}" for p in problems)
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content=jsonable_encoder({"detail": problems, "message": f"invalid request: {summary}"}),
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
