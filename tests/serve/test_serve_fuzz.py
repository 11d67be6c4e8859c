"""schemathesis over the native API's OpenAPI schema: bounded examples, no response is a 5xx."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from serve_fixtures import make_client, serve_index  # noqa: F401 (fixture)

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES_PER_OPERATION = int(os.environ.get("RETRIEVER_FUZZ_EXAMPLES", "8"))
TIME_BUDGET_S = float(os.environ.get("RETRIEVER_FUZZ_SECONDS", "25"))  # stops by itself after this


def test_no_generated_request_gets_a_5xx(serve_index, tiny_model, one_torch_thread):  # noqa: F811
    client = make_client(serve_index, tiny_model, watch_seconds=0, max_upload=1 << 20)
    app = client.app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/search", "/v1/search/image", "/v1/indexes/{name}/items/{item_id}/thumbnail"} <= paths
    deadline = time.monotonic() + TIME_BUDGET_S
    seen: dict[str, set[int]] = {}
    counter = [0]
    from schemathesis.generation.modes import GenerationMode

    def fuzzer(op, mode, label):
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case):
            if time.monotonic() > deadline:
                return
            params = case.path_parameters or {}
            if "name" in params and counter[0] % 2 == 0:  # half the cases name the real index
                params["name"] = "emoji"
                if "item_id" in params and counter[0] % 4 == 0:
                    params["item_id"] = counter[0] % 70  # ids 0..63 exist
            counter[0] += 1
            response = case.call()
            seen.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
            if response.status_code >= 400:
                assert "error" in response.json()

        return fuzz

    for op, mode in [(op, mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) for op in operations]:
        if time.monotonic() > deadline:
            break
        try:
            fuzzer(op, mode, f"{mode.value} {op.method.upper()} {op.path}")()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
            assert mode == GenerationMode.NEGATIVE
    print({op: sorted(codes) for op, codes in seen.items()})
    assert len(seen) >= len(operations) // 2, seen
    client.close()
