"""The OpenAPI 3.0 document of the inference server's routes (``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any

from cog.signature import Signature


def openapi_document(
    signature: Signature,
    *,
    title: str = "Cog model",
    description: str | None = None,
    version: str = "1",
) -> dict[str, Any]:
    """An OpenAPI 3.0 document for the inference server's routes, with ``signature``
    as the form of ``POST /infer``."""
    error = {"$ref": "#/components/schemas/Error"}
    status = {"$ref": "#/components/schemas/Status"}
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    return {
        "openapi": "3.0.3",
        "info": info,
        "paths": {
            "/infer": {
                "post": {
                    "summary": "Run one inference",
                    "requestBody": {
                        "required": any(arg.required for arg in signature.arguments),
                        "content": {
                            "multipart/form-data": {
                                "schema": {"$ref": "#/components/schemas/Input"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The output: text/plain for a string, "
                            "application/json for numbers, booleans, lists and "
                            "objects, application/octet-stream for bytes, the file's "
                            "own type for a file. Headers X-Setup-Time and X-Run-Time "
                            "give seconds.",
                            "content": {"*/*": {}},
                        },
                        "400": _json_response(
                            "The input is invalid; every problem is listed", error
                        ),
                        "415": _json_response("The body is not a form", error),
                        "500": _json_response("run() failed", error),
                        "503": _json_response("Not ready, busy or shutting down", error),
                    },
                }
            },
            "/ping": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": _json_response("Ready", status),
                        "503": _json_response("Starting, failed or stopping", status),
                    },
                }
            },
            "/help": {
                "get": {
                    "summary": "The input signature",
                    "responses": {"200": {"description": "The signature as JSON"}},
                }
            },
        },
        "components": {
            "schemas": {
                "Input": form_schema(signature),
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string"},
                        "problems": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "input": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                            },
                        },
                    },
                    "required": ["error"],
                },
                "Status": {
                    "type": "object",
                    "properties": {
                        "status": {
                            "type": "string",
                            "enum": ["starting", "ready", "failed", "stopping"],
                        },
                        "error": {"type": "string"},
                    },
                    "required": ["status"],
                },
            }
        },
    }


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_FORM_TYPES = {
    "str": {"type": "string"},
    "Secret": {"type": "string", "format": "password"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "Path": {"type": "string", "format": "binary"},
    "File": {"type": "string", "format": "binary"},
}


def form_schema(signature: Signature) -> dict[str, Any]:
    """The form of ``POST /infer`` as a JSON Schema object (OpenAPI 3.0 flavour)."""
    properties = {}
    for arg in signature.arguments:
        schema = dict(_FORM_TYPES[arg.type])
        if arg.is_list:
            schema = {"type": "array", "items": schema}
        if arg.help is not None:
            schema["description"] = arg.help
        if not arg.required:
            schema["default"] = list(arg.default) if arg.is_list and arg.default else arg.default
            if arg.default is None:
                schema["nullable"] = True
        if arg.min is not None:
            schema["minimum"] = arg.min
        if arg.max is not None:
            schema["maximum"] = arg.max
        if arg.options is not None:
            schema["enum"] = list(arg.options)
        properties[arg.name] = schema
    return {
        "type": "object",
        "properties": properties,
        "required": [arg.name for arg in signature.arguments if arg.required],
        "additionalProperties": False,
    }
