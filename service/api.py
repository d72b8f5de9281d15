"""REST routes (see DESIGN.md "REST"). Mutations need ``Authorization: Bearer <token>``, and so do reads unless
``IGAT_OPEN_READS`` (the local-development default): ``service.guard`` checks it before a body is read.

Submission body: the bare ExperimentSpec as JSON (what ``igat run`` reads from YAML), priority as a query
parameter: ``POST /experiments?priority=5``. Higher priorities run first; equal priorities run oldest first.
``POST /studies`` takes the bare StudySpec (what ``igat study`` reads) the same way and queues its plan.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError

from igat_core import rundir
from igat_core.spec import ExperimentSpec
from igat_core.study_spec import StudySpec, StudySpecError, parse_study, plan_study
from service import admission, store, studies
from service.auth import bearer, require_token
from service.bodies import YAML_MEDIA_TYPE, RawBody, invalid, spec_body
from service.db import session_scope
from service.models import FAILED, SUCCEEDED, TERMINAL
from service.storable import storable_json
from service.schemas import (
    ArtifactList,
    ArtifactOut,
    ErrorOut,
    EventOut,
    ExperimentDetail,
    ExperimentOut,
    ExperimentPage,
    Health,
    InvalidOut,
    MetricOut,
    MetricPage,
    Status,
    StudyDetail,
    StudyOut,
    StudyPage,
)

#: Models the OpenAPI document carries in components/schemas although no route declares them as a body or
#: response model (``service.app`` adds them; the routes read their bodies themselves: ``service.bodies``).
DOCUMENTED_MODELS = (ExperimentSpec, StudySpec, ErrorOut, InvalidOut)


def _json(description: str, model: type = ErrorOut) -> dict[str, Any]:
    """A documented JSON response; spelt out (not ``model=``) so that the SSE route documents it as JSON too."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def _body(model: type) -> dict[str, Any]:
    """A body of ``model`` as JSON, or as the YAML `igat run` reads (what the web UI sends for a pasted spec)."""
    schema = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    return {"requestBody": {"required": True, "content": {"application/json": schema, YAML_MEDIA_TYPE: schema}}}


#: What any route but /healthz may answer besides its own responses.
COMMON = {
    400: _json("a malformed header or path, or a value the database cannot store or look up (e.g. a NUL "
               "character)"),
    401: _json("missing or invalid bearer token (every mutation; every read when IGAT_OPEN_READS=false)"),
    413: _json("the request body is larger than IGAT_MAX_BODY_BYTES"),
    422: _json("invalid request: the first problems, each with its field path and reason (`omitted` counts the "
               "rest), or one reason", InvalidOut),
    503: _json("the database is unavailable, or the server has no API token configured (then every route that "
               "needs the token is disabled)"),
}
router = APIRouter()
api = APIRouter(responses=COMMON, dependencies=[Depends(bearer)])

NOT_FOUND = {404: _json("no experiment with that id")}
STUDY_NOT_FOUND = {404: _json("no study with that id")}
SSE_BATCH = 500
MAX_INT = 2**31 - 1
INLINE_TYPES = {".json", ".md", ".txt", ".log", ".yaml", ".yml", ".jsonl", ".csv", ".png", ".svg"}
MEDIA_TYPES = {".md": "text/markdown", ".jsonl": "application/x-ndjson", ".log": "text/plain",
               ".yaml": "application/yaml", ".yml": "application/yaml", ".pt": "application/octet-stream",
               ".pth": "application/octet-stream"}
#: The longest file name (bytes) of Linux file systems; a longer segment names no artifact.
NAME_MAX = 255


def _sessions(request: Request):
    return request.app.state.sessions


def _settings(request: Request):
    return request.app.state.settings


def request_hash(spec: ExperimentSpec, priority: int) -> str:
    canonical = json.dumps(
        {"spec": spec.model_dump(mode="json"), "priority": priority}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# -------------------------------------------------------------------------------------------------- health


@router.get("/healthz", response_model=Health, tags=["service"], responses={503: {"model": ErrorOut}})
def healthz(request: Request) -> Health:
    """Liveness and database reachability."""
    from sqlalchemy import text

    try:
        with session_scope(_sessions(request)) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means: not healthy
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"database unreachable: {type(exc).__name__}"
        ) from None
    return Health(status="ok", database="ok")


def _refused(exc: admission.Refused, *, split: bool) -> RequestValidationError:
    """A 422 like the spec's own: each field path (split into the body's keys when `split`) and its reason."""
    return RequestValidationError([{"loc": ("body", *(path.split(".") if split else [path])), "msg": reason,
                                    "type": "refused"} for path, reason in exc.problems])


# --------------------------------------------------------------------------------------------- experiments


@api.post(
    "/experiments",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExperimentDetail,
    dependencies=[Depends(require_token)],
    tags=["experiments"],
    responses={422: _json("invalid spec (the first problems, each with its field path and reason; also a "
                          "base.checkpoint outside the allowed roots or an ensemble over the size limits), or an "
                          "Idempotency-Key reused with another body", InvalidOut)},
    openapi_extra=_body(ExperimentSpec),
)
def submit_experiment(
    body: RawBody,
    request: Request,
    response: Response,
    priority: Annotated[int, Query(ge=-1000, le=1000, description="higher runs first")] = 0,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=255,
               description="same key + same body: the first response again; same key + other body: 422"),
    ] = None,
) -> ExperimentDetail:
    """Queue an experiment. The body is an ExperimentSpec (JSON, or YAML with Content-Type application/yaml);
    answers 202 with a Location header."""
    spec = _experiment(spec_body(body, request.headers.get("content-type")))
    digest = request_hash(spec, priority)
    with session_scope(_sessions(request)) as session:
        try:
            spec = admission.admit_experiment(spec, _settings(request), session)
        except admission.Refused as exc:
            raise _refused(exc, split=True) from None
        experiment, created = store.create_experiment(
            session,
            spec=spec.model_dump(mode="json"),
            name=spec.name,
            priority=priority,
            idempotency_key=idempotency_key,
            request_hash=digest,
        )
    response.headers["Location"] = f"/experiments/{experiment.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return ExperimentDetail.of(experiment)


@api.get("/experiments", response_model=ExperimentPage, tags=["experiments"])
def list_experiments(
    request: Request,
    status_: Annotated[list[Status] | None, Query(alias="status", description="repeat to OR several")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> ExperimentPage:
    """Experiments, newest first, optionally filtered by status; ``total`` counts every match."""
    with session_scope(_sessions(request)) as session:
        rows, total = store.list_experiments(session, statuses=status_ or (), limit=limit, offset=offset)
        items = [ExperimentOut.of(row) for row in rows]
    return ExperimentPage(items=items, total=total, limit=limit, offset=offset)


@api.get("/experiments/{experiment_id}", response_model=ExperimentDetail, tags=["experiments"],
            responses=NOT_FOUND)
def get_experiment(experiment_id: str, request: Request) -> ExperimentDetail:
    with session_scope(_sessions(request)) as session:
        return ExperimentDetail.of(store.get_experiment(session, experiment_id))


@api.post(
    "/experiments/{experiment_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExperimentOut,
    dependencies=[Depends(require_token)],
    tags=["experiments"],
    responses={**NOT_FOUND, 409: _json("the experiment already finished")},
)
def cancel_experiment(experiment_id: str, request: Request) -> ExperimentOut:
    """Queued: cancelled at once. Running: ``cancelling`` until the dispatcher has stopped the process."""
    with session_scope(_sessions(request)) as session:
        try:
            experiment = store.request_cancel(session, experiment_id)
        except store.IllegalTransition as exc:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"experiment {experiment_id} already {exc.current}; nothing to cancel"
            ) from None
        return ExperimentOut.of(experiment)


# ------------------------------------------------------------------------------------------------ studies

IDEMPOTENCY_KEY = Header(alias="Idempotency-Key", min_length=1, max_length=255,
                         description="same key + same body: the first response again; same key + other body: 422")


def _experiment(body: Any) -> ExperimentSpec:
    """The ExperimentSpec of a decoded request body, or a 422 naming each problem's field."""
    try:
        return ExperimentSpec.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
             for e in exc.errors(include_url=False, include_context=False, include_input=False)]
        ) from None


def _study(body: Any) -> StudySpec:
    """The StudySpec of a decoded request body, or a 422 naming each problem's field (as for an ExperimentSpec)."""
    if not isinstance(body, dict):
        raise invalid((), "expected a JSON object (a dictionary of StudySpec fields)", "dict_type")
    try:
        return parse_study(body, "(request body)")
    except StudySpecError as exc:
        raise RequestValidationError(
            [{"loc": ("body", path), "msg": reason, "type": "study_spec"} for path, reason in exc.problems]
        ) from None


@api.post(
    "/studies",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyDetail,
    dependencies=[Depends(require_token)],
    tags=["studies"],
    responses={422: _json("invalid study (each field path, e.g. grid.igat.rule[2], and reason; also a "
                          "base.checkpoint outside the allowed roots or an ensemble over the size limits), or an "
                          "Idempotency-Key reused with another body", InvalidOut)},
    openapi_extra=_body(StudySpec),
)
def submit_study(
    body: RawBody,
    request: Request,
    response: Response,
    priority: Annotated[int, Query(ge=-1000, le=1000, description="of every run; higher runs first")] = 0,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
) -> StudyDetail:
    """Queue every experiment of a study's plan; the runs that share a pretrained base wait for the one that
    trains it. The body is a StudySpec as JSON, or as the YAML `igat study` reads (Content-Type application/yaml);
    answers 202 with a Location header."""
    study = _study(spec_body(body, request.headers.get("content-type")))
    plan = plan_study(study)
    digest = studies.request_hash(study, plan, priority)
    with session_scope(_sessions(request)) as session:
        try:
            plan = admission.admit_plan(study, plan, _settings(request), session)
        except admission.Refused as exc:
            raise _refused(exc, split=False) from None
        row, created = store.create_study(
            session, spec=study.model_dump(mode="json"), plan=plan, artifact_root=_settings(request).artifact_root,
            priority=priority, idempotency_key=idempotency_key, request_hash=digest,
        )
        detail = StudyDetail.of(row, store.study_experiments(session, [row.id])[row.id])
    response.headers["Location"] = f"/studies/{detail.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return detail


@api.get("/studies", response_model=StudyPage, tags=["studies"])
def list_studies(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> StudyPage:
    """Studies, newest first, each with its status, counts per status and progress."""
    with session_scope(_sessions(request)) as session:
        rows, total = store.list_studies(session, limit=limit, offset=offset)
        runs = store.study_experiments(session, [row.id for row in rows])
        items = [StudyOut.of(row, runs[row.id]) for row in rows]
    return StudyPage(items=items, total=total, limit=limit, offset=offset)


@api.get("/studies/{study_id}", response_model=StudyDetail, tags=["studies"], responses=STUDY_NOT_FOUND)
def get_study(study_id: str, request: Request) -> StudyDetail:
    """The study with each run's status, arm, grid point and dependency, in plan order."""
    with session_scope(_sessions(request)) as session:
        row = store.get_study(session, study_id)
        return StudyDetail.of(row, store.study_experiments(session, [study_id])[study_id])


@api.get(
    "/studies/{study_id}/results",
    tags=["studies"],
    responses={200: {"description": f"the study's {rundir.RESULTS_FILE} as `igat study` writes it (runs, counts, "
                     "tables), plus its id; unfinished runs are counted as pending"}, **STUDY_NOT_FOUND},
)
def get_study_results(study_id: str, request: Request) -> JSONResponse:
    with session_scope(_sessions(request)) as session:
        row = store.get_study(session, study_id)
        runs = store.study_experiments(session, [study_id])[study_id]
    return JSONResponse(storable_json(studies.results(row, runs, Path(_settings(request).artifact_root))))


@api.post(
    "/studies/{study_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyDetail,
    dependencies=[Depends(require_token)],
    tags=["studies"],
    responses={**STUDY_NOT_FOUND, 409: _json("every run already finished")},
)
def cancel_study(study_id: str, request: Request) -> StudyDetail:
    """Cancel every unfinished run (queued: at once; running: through cancelling, as for one experiment)."""
    with session_scope(_sessions(request)) as session:
        try:
            row = store.request_study_cancel(session, study_id)
        except store.StudyFinished as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return StudyDetail.of(row, store.study_experiments(session, [study_id])[study_id])


# ------------------------------------------------------------------------------------------ events (SSE)


def _stream_start(
    experiment_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT, description="start after this seq (Last-Event-ID wins)")
    ] = None,
) -> tuple[str, int]:
    """Checked before the stream opens, so an unknown id is a plain 404 rather than a broken stream."""
    start = after or 0
    if last_event_id is not None and last_event_id.strip():
        try:
            start = int(last_event_id.strip())
        except ValueError:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, "Last-Event-ID must be the seq of an event of this stream"
            ) from None
        if not 0 <= start <= MAX_INT:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"Last-Event-ID must be between 0 and {MAX_INT}")
    with session_scope(_sessions(request)) as session:
        store.get_experiment(session, experiment_id)
    return experiment_id, start


@api.get(
    "/experiments/{experiment_id}/events",
    response_class=EventSourceResponse,
    tags=["experiments"],
    responses={**NOT_FOUND, 400: _json("Last-Event-ID is not a seq between 0 and 2**31 - 1, or a value the "
                                       "database cannot look up")},
)
async def stream_events(
    request: Request, start: Annotated[tuple[str, int], Depends(_stream_start)]
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: each has ``id: <seq>`` and a JSON EventOut as data. Reconnect with Last-Event-ID
    to resume. Once the experiment is finished and every event was sent, a final ``event: end`` closes it."""
    experiment_id, last = start
    sessions = _sessions(request)
    poll_s = _settings(request).sse_poll_s

    def fetch(after_seq: int) -> tuple[str, list[EventOut]]:
        with session_scope(sessions) as session:
            experiment = store.get_experiment(session, experiment_id)  # status first, then events: see below
            events = [EventOut.of(e) for e in store.events_after(session, experiment_id, after_seq, SSE_BATCH)]
            return experiment.status, events

    yield ServerSentEvent(comment=f"events of experiment {experiment_id}", retry=2000)
    while True:
        try:
            current, events = await anyio.to_thread.run_sync(fetch, last)
        except store.NotFound:
            return
        for event in events:
            yield ServerSentEvent(id=str(event.seq), data=event.model_dump(mode="json"))
            last = event.seq
        # The status was read before the events in one transaction, and a run's final events are stored
        # before its terminal status: terminal + a short batch means everything has been sent.
        if current in TERMINAL and len(events) < SSE_BATCH:
            yield ServerSentEvent(event="end", data={"status": current, "last_seq": last})
            return
        if len(events) < SSE_BATCH:
            await anyio.sleep(poll_s)


@api.get("/experiments/{experiment_id}/metrics", response_model=MetricPage, tags=["experiments"],
            responses=NOT_FOUND)
def get_metrics(
    experiment_id: str,
    request: Request,
    phase: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="pretrain | igat")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> MetricPage:
    """Per-epoch metrics in the order they first appeared; one row per (phase, epoch), updated in place."""
    with session_scope(_sessions(request)) as session:
        store.get_experiment(session, experiment_id)
        rows, total = store.metrics_page(session, experiment_id, phase=phase, limit=limit, offset=offset)
        items = [MetricOut.of(m) for m in rows]
    return MetricPage(items=items, total=total, limit=limit, offset=offset)


# --------------------------------------------------------------------------------------- results, artifacts


def _run_dir(request: Request, experiment) -> Path:
    if experiment.run_dir:
        return Path(experiment.run_dir)
    return rundir.run_dir_of(_settings(request).artifact_root, experiment.id)


@api.get(
    "/results/{experiment_id}",
    tags=["results"],
    responses={
        200: {"description": f"the experiment's {rundir.RESULTS_FILE}, as the runner wrote it"},
        **NOT_FOUND,
        409: _json("the experiment has not succeeded (yet)"),
    },
)
def get_results(experiment_id: str, request: Request) -> JSONResponse:
    with session_scope(_sessions(request)) as session:
        experiment = store.get_experiment(session, experiment_id)
    if experiment.status != SUCCEEDED:
        if experiment.status == FAILED:
            first_line = (experiment.error or "").strip().splitlines()[:1]
            why = f": {first_line[0]}" if first_line else ""
            detail = f"experiment {experiment_id} failed{why}; it has no results"
        elif experiment.status in TERMINAL:
            detail = f"experiment {experiment_id} was {experiment.status}; it has no results"
        else:
            detail = f"experiment {experiment_id} is {experiment.status}; results are available once it has succeeded"
        raise HTTPException(status.HTTP_409_CONFLICT, detail)
    content = rundir.read_results(_run_dir(request, experiment))
    if content is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"experiment {experiment_id} succeeded but its {rundir.RESULTS_FILE} is missing"
        )
    return JSONResponse(storable_json(content))  # a NaN accuracy is "NaN": strict JSON, as every response


@api.get("/results/{experiment_id}/artifacts", response_model=ArtifactList, tags=["results"],
            responses=NOT_FOUND)
def list_artifacts(experiment_id: str, request: Request) -> ArtifactList:
    """Files of the run directory (recorded when the run ended; listed live while it runs)."""
    with session_scope(_sessions(request)) as session:
        experiment = store.get_experiment(session, experiment_id)
        recorded = store.list_artifacts(session, experiment_id)
    if recorded:
        return ArtifactList(items=[ArtifactOut.of(experiment_id, a) for a in recorded])
    found = rundir.artifact_files(_run_dir(request, experiment))
    return ArtifactList(items=[ArtifactOut.of(experiment_id, item) for item in found])


def resolve_artifact(root: Path, raw: str) -> Path:
    """The file ``raw`` names inside ``root``, or an HTTPException. ``raw`` is already URL-decoded."""
    if not raw or "\x00" in raw or "\\" in raw:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid artifact path")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "artifact paths are relative to the run directory")
    parts = raw.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "artifact paths may not contain '.', '..' or empty segments")
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in parts):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"artifact path segments are at most {NAME_MAX} bytes long")
    base = root.resolve()
    try:
        target = (base / raw).resolve()
        inside, is_file = target.is_relative_to(base), target.is_file()
    except (OSError, ValueError):  # e.g. a path longer than the system allows: it names no file
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {raw!r}") from None
    if not inside:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "artifact path leads outside the experiment's directory")
    if not is_file:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {raw!r}")
    return target


@api.get(
    "/results/{experiment_id}/artifacts/{path:path}",
    response_class=FileResponse,
    tags=["results"],
    responses={
        200: {"description": "the file, with the media type of its name (application/octet-stream when unknown)",
              "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        **NOT_FOUND,
        400: _json(f"malformed path ('..', absolute, a segment longer than {NAME_MAX} bytes, ...)"),
        403: _json("the path leads outside the experiment's run directory"),
    },
)
def get_artifact(experiment_id: str, path: str, request: Request) -> FileResponse:
    """One file of the experiment's run directory (any status: logs are readable while it runs)."""
    with session_scope(_sessions(request)) as session:
        experiment = store.get_experiment(session, experiment_id)
    root = _run_dir(request, experiment)
    if not root.is_dir():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"experiment {experiment_id} has no files yet")
    target = resolve_artifact(root, path)
    suffix = target.suffix.lower()
    media_type = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return FileResponse(
        target,
        media_type=media_type,
        filename=target.name,
        content_disposition_type="inline" if suffix in INLINE_TYPES else "attachment",
        headers={"X-Content-Type-Options": "nosniff"},
    )


router.include_router(api)
