"""Property-based fuzzing over the OpenAPI schema (schemathesis): whatever a client sends, no 5xx, and every
answer has a documented status code, a documented content type and, for JSON, a body of the documented schema.

Schemathesis generates schema-valid ("positive") and schema-violating ("negative") requests for every
operation and sends them in-process to the ASGI app (its client runs the app's lifespan, so the models are
loaded). Half of the generated requests name a served model, so that they reach the models and not only the 404.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi

from service.app import create_app
from service.settings import Settings

# The bound of the whole run is examples x operations x modes: about 10 s on two busy CPU cores.
EXAMPLES_PER_OPERATION = 40
TIME_BUDGET_S = 60
# Every check that applies to this API. Schemathesis' stricter ones (positive_data_acceptance,
# negative_data_rejection, ...) judge whether a request *should* have been accepted; they are not used,
# because the service's limits (latent size per model, n <= max_samples) are not all expressible in the schema.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,  # JSON answers only; PNG answers are checked by content type
]


@pytest.fixture(scope="module")
def app(tiny_models: Path) -> Iterator[FastAPI]:
    app = create_app(Settings(model_dir=tiny_models, max_wait_ms=1.0, max_samples=32, max_steps=16))
    yield app
    asgi.shutdown_lifespans()  # drain the runtime that schemathesis' client started


def with_served_model(case: Any, model: str | None) -> Any:
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    return case


def fuzz(operation: Any, mode: GenerationMode, statuses: Counter[int], failures: list[str]) -> None:
    """Send generated requests for one operation; count the statuses and collect the failed checks."""
    cases = st.builds(with_served_model, operation.as_strategy(generation_mode=mode),
                      st.sampled_from([None, "mnist", "faces"]))

    @given(case=cases)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=2000, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        response = case.call()
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as exc:  # schemathesis raises a FailureGroup (a BaseExceptionGroup)
            failures.append(f"{operation.label} ({mode}): {str(exc)[:1500]}")

    try:
        run()
    except Unsatisfiable:  # no parameters and no body: nothing to break in negative mode
        assert mode == GenerationMode.NEGATIVE


def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    readyz = schema["/readyz"]["GET"]
    deadline = time.monotonic() + 30
    while readyz.Case().call().status_code != 200:  # the first call starts the lifespan; models load meanwhile
        assert time.monotonic() < deadline, "the models did not load"
        time.sleep(0.05)

    started = time.monotonic()
    failures: list[str] = []
    statuses: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # schemathesis could not read this operation's schema
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, statuses.setdefault(operation.label, Counter()), failures)
    elapsed = time.monotonic() - started

    assert not failures, "\n\n".join(failures[:5])
    assert elapsed < TIME_BUDGET_S
    assert statuses["POST /sample"][200] > 0, statuses  # the fuzzing reached the models, not only the 404
    assert all(status < 500 for counts in statuses.values() for status in counts)
