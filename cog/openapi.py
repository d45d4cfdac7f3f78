"""The OpenAPI 3 document of a model's image: Cog's shape, so tools that read Cog's schema
read ours (``GET /openapi.json``, and the image label ``run.cog.openapi_schema``).

``components.schemas`` holds ``Input`` (the JSON ``input`` of ``POST /predictions``, with
``x-order``, ``minimum``/``maximum``, ``format: uri`` for files, ``x-cog-secret``, choices
as an enum schema of their own referenced with ``allOf``), ``Output`` (with the iterator
markers ``x-cog-array-type``/``x-cog-array-display``), ``PredictionRequest``,
``PredictionResponse``, ``Status``, ``WebhookEvent`` and the validation errors; the 2021
routes are described too (``InferForm`` is the form of ``POST /infer``).

Standard library only: the cog server (labels) and the inference server use it.
"""

from __future__ import annotations

from typing import Any

from cog.signature import NO_DEFAULT, Argument, OutputType, Signature

_JSON_TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
    "any": {"type": "object"},
}
_FORM_TYPES = {
    **_JSON_TYPES,
    "Path": {"type": "string", "format": "binary"},
    "File": {"type": "string", "format": "binary"},
    "Secret": {"type": "string", "format": "password"},
}
_REF = "#/components/schemas/"


def title(name: str) -> str:
    return name.replace("_", " ").title()


def _default(argument: Argument) -> Any:
    default = argument.default
    return list(default) if argument.is_list and default else default


def input_schema(signature: Signature) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``Input`` schema, and the enum schemas of inputs with choices (by name)."""
    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required = []
    for order, arg in enumerate(signature.arguments):
        prop: dict[str, Any] = {"x-order": order}
        item = dict(_JSON_TYPES[arg.type])
        if arg.options is not None:
            enums[arg.name] = {
                "title": arg.name,
                "description": "An enumeration.",
                "enum": list(arg.options),
                "type": item["type"],
            }
            item = {"allOf": [{"$ref": _REF + arg.name}]}
        else:
            prop["title"] = title(arg.name)
        if arg.is_list:
            prop.update({"type": "array", "items": item})
        else:
            prop.update(item)
        if arg.required:
            required.append(arg.name)
        else:
            if arg.default is not None:
                prop["default"] = _default(arg)
            else:
                prop["nullable"] = True
        if arg.help is not None:
            prop["description"] = arg.help
        for key, schema_key in (
            ("min", "minimum"),
            ("max", "maximum"),
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
            ("regex", "pattern"),
        ):
            if getattr(arg, key) is not None:
                prop[schema_key] = getattr(arg, key)
        if arg.deprecated:
            prop["deprecated"] = True
        properties[arg.name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def output_schema(output: OutputType | None) -> dict[str, Any]:
    """The ``Output`` schema (a 2021 model's output is anything: an empty schema)."""
    if output is None:
        return {"title": "Output"}
    return {"title": "Output", **_output(output)}


def _output(output: OutputType) -> dict[str, Any]:
    if output.type == "object":
        properties = {}
        required = []
        for name, field in output.fields:
            properties[name] = {"title": title(name), **_output(field)}
            if field.optional:
                properties[name]["nullable"] = True
            else:
                required.append(name)
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
    else:
        schema = dict(_JSON_TYPES[output.type])
        schema.pop("writeOnly", None)
    if output.is_list:
        schema = {"type": "array", "items": schema}
    if output.iterator:
        schema = {"type": "array", "items": schema, "x-cog-array-type": "iterator"}
        if output.concatenate:
            schema["x-cog-array-display"] = "concatenate"
    return schema


def form_schema(signature: Signature) -> dict[str, Any]:
    """The form of ``POST /infer`` (files as uploads)."""
    properties = {}
    for arg in signature.arguments:
        schema = dict(_FORM_TYPES[arg.type])
        schema.pop("x-cog-secret", None)
        schema.pop("writeOnly", None)
        if arg.is_list:
            schema = {"type": "array", "items": schema}
        if arg.help is not None:
            schema["description"] = arg.help
        if arg.default is not NO_DEFAULT:
            schema["default"] = _default(arg)
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


def _json(description: str, ref: str | dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": _REF + ref} if isinstance(ref, str) else ref
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(
    signature: Signature,
    *,
    title: str = "Cog",
    description: str | None = None,
    version: str = "1",
) -> dict[str, Any]:
    """The whole document for a model with this signature."""
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    inputs, enums = input_schema(signature)
    validation = _json("Validation Error", "HTTPValidationError")
    prediction_id = [
        {
            "required": True,
            "schema": {"title": "Prediction ID", "type": "string"},
            "name": "prediction_id",
            "in": "path",
        }
    ]
    request_body = {
        "content": {"application/json": {"schema": {"$ref": _REF + "PredictionRequest"}}}
    }
    empty = _json("Successful Response", {})
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": empty}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": empty},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "parameters": [
                    {
                        "in": "header",
                        "name": "prefer",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": request_body,
                "responses": {
                    "200": _json("Successful Response", "PredictionResponse"),
                    "422": validation,
                },
            }
        },
        "/predictions/{prediction_id}": {
            "put": {
                "summary": "Predict Idempotent",
                "description": "Run a single prediction on the model (idempotent creation).",
                "operationId": "predict_idempotent_predictions__prediction_id__put",
                "parameters": prediction_id,
                "requestBody": {"required": True, **request_body},
                "responses": {
                    "200": _json("Successful Response", "PredictionResponse"),
                    "422": validation,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": prediction_id,
                "responses": {"200": empty, "422": validation},
            }
        },
        "/infer": {
            "post": {
                "summary": "Run one inference (the 2021 route)",
                "requestBody": {
                    "required": any(arg.required for arg in signature.arguments),
                    "content": {"multipart/form-data": {"schema": {"$ref": _REF + "InferForm"}}},
                },
                "responses": {
                    "200": {
                        "description": "The output: text/plain for a string, application/json "
                        "for numbers, booleans, lists and objects, application/octet-stream "
                        "for bytes, the file's own type for a file. Headers X-Setup-Time and "
                        "X-Run-Time give seconds.",
                        "content": {"*/*": {}},
                    },
                    "400": _json("The input is invalid; every problem is listed", "Error"),
                    "415": _json("The body is not a form", "Error"),
                    "500": _json("run() failed", "Error"),
                    "503": _json("Not ready, busy or shutting down", "Error"),
                },
            }
        },
        "/ping": {
            "get": {
                "summary": "Readiness (the 2021 route)",
                "responses": {
                    "200": _json("Ready", "PingStatus"),
                    "503": _json("Starting, failed or stopping", "PingStatus"),
                },
            }
        },
        "/help": {
            "get": {
                "summary": "The signature (the 2021 route)",
                "responses": {"200": {"description": "The signature as JSON"}},
            }
        },
    }
    schemas: dict[str, Any] = {
        "Input": inputs,
        "Output": output_schema(signature.output),
        **enums,
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "input": {"$ref": _REF + "Input"},
                "id": {"title": "Id", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
                "webhook": {
                    "title": "Webhook",
                    "maxLength": 65536,
                    "minLength": 1,
                    "type": "string",
                    "format": "uri",
                },
                "webhook_events_filter": {
                    "type": "array",
                    "items": {"$ref": _REF + "WebhookEvent"},
                    "default": ["start", "output", "logs", "completed"],
                },
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": _REF + "Input"},
                "output": {"$ref": _REF + "Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                "completed_at": {
                    "title": "Completed At",
                    "type": "string",
                    "format": "date-time",
                },
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "error": {"title": "Error", "type": "string"},
                "status": {"$ref": _REF + "Status"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "WebhookEvent": {
            "title": "WebhookEvent",
            "description": "An enumeration.",
            "enum": ["start", "output", "logs", "completed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": _REF + "ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
        "InferForm": form_schema(signature),
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
        "PingStatus": {
            "type": "object",
            "properties": {
                "status": {
                    "type": "string",
                    "enum": ["starting", "ready", "failed", "defunct", "stopping"],
                },
                "error": {"type": "string"},
            },
            "required": ["status"],
        },
    }
    return {
        "openapi": "3.0.2",
        "info": info,
        "paths": paths,
        "components": {"schemas": schemas},
    }
