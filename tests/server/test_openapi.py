"""The published schema documents the statuses each API family really answers with."""

from __future__ import annotations

from server.app import create_app
from server.errors import api_family
from tests.support import settings


def test_validation_status_matches_each_family():
    schema = create_app(settings()).openapi()
    families = set()
    for path, operations in schema["paths"].items():
        family = api_family(path)
        families.add(family)
        for operation in operations.values():
            responses = operation["responses"]
            assert "400" in responses and "500" in responses
            # TEI answers bad input with 422; OpenAI and KServe with 400, so FastAPI's default 422 is dropped.
            assert ("422" in responses) == (family == "tei"), (path, sorted(responses))
    assert families == {"openai", "kserve", "tei"}
