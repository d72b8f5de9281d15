"""Schemathesis against the real app (in-process ASGI, a real SQLite database, the token sent): every generated
request must answer without a 5xx and with a status, content type, headers and body its OpenAPI document allows.

Deployed mode (IGAT_OPEN_READS=false), so that the document's security holds for every route it lists. No
dispatcher runs: submitted experiments stay queued. Derandomized with a fixed budget per operation, so a run is
the same every time and takes a bounded time; the last test checks that at least MIN_REQUESTS were sent.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

try:
    from tests.service_fixtures import AUTH, create_schema, make_settings
except ImportError:
    from service_fixtures import AUTH, create_schema, make_settings

#: Generated requests per operation and generation mode (positive: valid by the schema; negative: invalid).
MAX_EXAMPLES = 50
MIN_REQUESTS = 1000
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
sent: list[str] = []


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from service.app import create_app
    from service.db import make_session_factory

    tmp = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{tmp / 'igat.db'}"
    engine = create_schema(url)
    app = create_app(make_settings(tmp, url, open_reads=False), session_factory=make_session_factory(engine))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.dispose()


def fuzz(operation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def answered_as_documented(case) -> None:
        sent.append(f"{case.method} {case.path}")
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    answered_as_documented()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_generated_request_is_answered_as_documented(api, mode):
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        raw = operation.definition.raw
        if mode is GenerationMode.NEGATIVE and not (raw.get("parameters") or raw.get("requestBody")):
            continue  # nothing of the request to make invalid (/healthz)
        fuzz(operation, mode)


def test_the_fuzzing_sent_enough_requests():
    print(f"schemathesis sent {len(sent)} requests")
    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} requests were generated"
