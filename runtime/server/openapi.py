"""``GET /openapi.json``: the HTTP API of CONTRACT.md as an OpenAPI 3.1 document."""

from __future__ import annotations

from typing import Any

from captionfleet.runtime.engine.options import MAX_BEAMS, MAX_NEW_TOKENS, MAX_SUGGESTIONS, STYLES
from captionfleet.version import __version__

_ERROR_CODES = {
    "400": "Bad input: undecodable image, too many pixels, bad options, malformed JSON/base64/multipart, "
    "missing image field, refused or unfetchable URL",
    "401": "Missing or unknown X-API-Key",
    "413": "Body (or fetched image) larger than the limit",
    "415": "Not an image in an accepted format (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF; sniffed)",
    "422": "content_blocked: the moderation service refused the image (the reason in the message)",
    "429": "Rate limit of the API key exceeded (see Retry-After)",
    "500": "Server fault",
    "503": "Queue full, draining, not ready, no job store, or moderation_unavailable (see Retry-After)",
    "504": "The request's deadline passed while it waited",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors() -> dict[str, Any]:
    return {
        code: {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
        for code, text in _ERROR_CODES.items()
    }


def _options_properties() -> dict[str, Any]:
    return {
        "suggestions": {"type": "integer", "minimum": 1, "maximum": MAX_SUGGESTIONS, "default": 1},
        "style": {"type": "string", "enum": sorted(STYLES), "description": "A named preset"},
        "prompt": {"type": "string", "maxLength": 200, "description": "A caption prefix"},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": MAX_BEAMS},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS},
    }


def _query_parameters() -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in _options_properties().items()
    ]


_HEADERS = [
    {
        "name": "X-API-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Required when the server has API keys configured",
    },
    {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Echoed in the response; generated when absent",
    },
    {
        "name": "X-User-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Sticky A/B assignment (used by the router)",
    },
    {
        "name": "X-Request-Timeout-Ms",
        "in": "header",
        "required": False,
        "schema": {"type": "number", "exclusiveMinimum": 0},
        "description": "The client's deadline in ms, queue time included; it only shortens the server's",
    },
]


def _source_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "url": {"type": "string", "format": "uri", "description": "http(s) URL of the image"},
            "image_base64": {"type": "string", "description": "The image, base64 (data: URLs accepted)"},
        },
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "captionfleet runtime",
            "version": __version__,
            "description": "Image captioning with dynamic batching, a result cache and top-N suggestions.",
        },
        "paths": {
            "/v1/caption": _captioning_post(
                "Caption one image", _caption_bodies(), "The caption", "CaptionResponse"
            ),
            "/v1/caption/batch": _captioning_post(
                "Caption several images; results in order, each a caption or an error",
                _batch_bodies(),
                "One result per image, in order",
                "BatchResponse",
            ),
            **_job_paths(),
            **_probe_paths(),
        },
        "components": {"schemas": _schemas()},
    }


def _captioning_post(summary: str, bodies: dict[str, Any], answer: str, schema: str) -> dict[str, Any]:
    """Both captioning routes take the same query options and headers and fail the same ways; only
    their bodies and their answer's schema differ."""
    return {
        "post": {
            "summary": summary,
            "parameters": _query_parameters() + _HEADERS,
            "requestBody": {"required": True, "content": bodies},
            "responses": {
                "200": {"description": answer, "content": {"application/json": {"schema": _ref(schema)}}},
                **_errors(),
            },
        }
    }


def _with_options(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An object body whose one required ``field`` comes with the options: the options can ride in a
    form or JSON body as well as in the query."""
    return {
        "type": "object",
        "required": [field],
        "properties": {field: schema, **_options_properties()},
    }


def _caption_bodies() -> dict[str, Any]:
    # JSON names its one image by URL or base64 (neither is required alone), hence no _with_options.
    caption_json = {**_source_schema()}
    caption_json["properties"] = {**caption_json["properties"], **_options_properties()}
    return {
        "multipart/form-data": {"schema": _with_options("image", {"type": "string", "format": "binary"})},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": caption_json},
    }


def _batch_bodies() -> dict[str, Any]:
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "multipart/form-data": {"schema": _with_options("images", files)},
        "application/json": {"schema": _with_options("images", {"type": "array", "items": _source_schema()})},
    }


def _job_paths() -> dict[str, Any]:
    """The job API: submit, state, results (JSON Lines in input order), cancel."""
    job = {"application/json": {"schema": _ref("Job")}}
    item = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string", "format": "uri"},
            "image_base64": {"type": "string"},
        },
    }
    submission = {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": item},
            "options": {"type": "object", "properties": _options_properties()},
            "webhook": {"type": "string", "format": "uri"},
            "webhook_secret": {"type": "string"},
        },
    }
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    one = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    missing = {
        "description": "No such job (never made, expired, or another key's)",
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    found = {"200": {"description": "The job", "content": job}, "404": missing, **_errors()}
    return {
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job of many images, captioned with the fleet's spare capacity",
                "parameters": _HEADERS,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": submission},
                        "multipart/form-data": {"schema": _with_options("images", files)},
                    },
                },
                "responses": {"202": {"description": "Accepted", "content": job}, **_errors()},
            }
        },
        "/v1/jobs/{job_id}": {
            "get": {"summary": "The job's status and counts", "parameters": one, "responses": found},
            "delete": {"summary": "Cancel the items not started", "parameters": one, "responses": found},
        },
        "/v1/jobs/{job_id}/results": {
            "get": {
                "summary": "One JSON line per finished item, in input order: {index, id, result|error}",
                "parameters": one,
                "responses": {
                    "200": {"description": "JSON Lines", "content": {"application/x-ndjson": {}}},
                    "404": missing,
                },
            }
        },
    }


def _job_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "status", "counts"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "counts": {
                "type": "object",
                "properties": {k: {"type": "integer"} for k in ("total", "done", "failed")},
            },
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }


def _probe_paths() -> dict[str, Any]:
    """The routes for people and probes rather than clients: no options, no error bodies."""
    return {
        "/v1/models": {
            "get": {
                "summary": "The loaded model and its version",
                "responses": {"200": {"description": "Model information"}},
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Alive"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: model loaded and warm, not draining",
                "responses": {
                    "200": {"description": "Ready"},
                    "503": {"description": "Not ready or draining"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (captionfleet_*)",
                "responses": {"200": {"description": "Text exposition format"}},
            }
        },
    }


def _ood_fields() -> dict[str, Any]:
    """Present once the model has reference statistics (absent before, and with --ood false)."""
    return {
        "ood_score": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "How unusual the image is for the model (its quantile among reference images)",
        },
        "in_distribution": {"type": "boolean", "description": "ood_score at most the model's threshold"},
    }


def _schemas() -> dict[str, Any]:
    suggestion = {
        "type": "object",
        "required": ["text", "confidence"],
        "properties": {"text": {"type": "string"}, "confidence": {"type": "number"}},
    }
    caption_fields = {
        "caption": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "suggestions": {"type": "array", "items": suggestion},
        "model_version": {"type": "string"},
        "cached": {"type": "boolean"},
        "latency_ms": {"type": "number"},
    }
    error_body = {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    }
    return {
        "Suggestion": suggestion,
        "CaptionResponse": {
            "type": "object",
            "required": [*caption_fields, "request_id"],
            "properties": {**caption_fields, **_ood_fields(), "request_id": {"type": "string"}},
        },
        "BatchResponse": {
            "type": "object",
            "required": ["results", "request_id"],
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            {
                                "type": "object",
                                "required": list(caption_fields),
                                "properties": caption_fields,
                            },
                            {
                                "type": "object",
                                "required": ["error", "status"],
                                "properties": {"error": error_body, "status": {"type": "integer"}},
                            },
                        ]
                    },
                },
                "model_version": {"type": "string"},
                "latency_ms": {"type": "number"},
                "request_id": {"type": "string"},
            },
        },
        "Job": _job_schema(),
        "Error": {
            "type": "object",
            "required": ["error", "request_id"],
            "properties": {"error": error_body, "request_id": {"type": "string"}},
        },
    }
