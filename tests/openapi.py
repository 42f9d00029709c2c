"""Validate responses against the plugin's OpenAPI definition (from ../shared/reference).

Three deviations, documented in the protocol brief, are applied to the schema
here because Grafana relies on them: null datapoint values (gaps), table rows
as arrays of cells, and /variable items with __text/__value beside text/value.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "simpod-json-datasource.openapi.yaml"


@cache
def _spec() -> dict:
    import yaml

    spec = yaml.safe_load(SPEC.read_text())
    query = spec["paths"]["/query"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    timeseries, table = query["items"]["anyOf"]
    timeseries["properties"]["datapoints"]["items"]["items"]["nullable"] = True
    table["properties"]["rows"]["items"] = {"type": "array"}
    return spec


def _resolve(node, spec):
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            return _resolve(copy.deepcopy(spec["components"]["schemas"][name]), spec)
        return {k: _resolve(v, spec) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, spec) for v in node]
    return node


def available() -> bool:
    return SPEC.exists()


def response_schema(path: str) -> dict | None:
    spec = _spec()
    resp = spec["paths"][path]["post" if path != "/" else "get"]["responses"]["200"]
    content = resp.get("content", {}).get("application/json")
    return _resolve(content["schema"], spec) if content else None


def validate(path: str, body) -> None:
    """Validate when the definition is at hand; without it the calling test goes on unvalidated
    (``test_openapi_definition_is_available`` then reports the skip once)."""
    from openapi_schema_validator import OAS30Validator

    if not available():
        return
    schema = response_schema(path)
    if schema is not None:
        OAS30Validator(schema).validate(body)
