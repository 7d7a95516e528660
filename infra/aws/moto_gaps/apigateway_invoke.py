"""Invoking an API Gateway REST API stage, which moto 5.2.5 in server mode cannot do.

moto stores REST APIs, stages, keys and usage plans but answers no request to a stage. This
fill serves stage requests inside the embedded server, as plain HTTP, at either:

- ``{endpoint}/restapis/{api_id}/{stage}/_user_request_/{path}`` (the path form moto and
  LocalStack document for a local endpoint), or
- any path on the endpoint with ``Host: {api_id}.execute-api.{region}.amazonaws.com`` (the real
  invoke URL's host), then ``/{stage}/{path}``.

So a client holding the stage URL ``https://{api}.execute-api.{region}.amazonaws.com/{stage}``
on AWS uses ``{endpoint}/restapis/{api}/{stage}/_user_request_`` here and nothing else
changes (``stage_url()`` in ``infra.telemetry.apigw`` gives the right one). What runs, in
API Gateway's order and with its answers:

1. resource match (``{param}`` and ``{proxy+}`` segments), else 403
   ``Missing Authentication Token``;
2. ``apiKeyRequired``: an enabled key in ``x-api-key`` that a usage plan of this API stage
   holds, else 403 ``Forbidden``;
3. the usage plan's ``throttle`` (token bucket: ``rateLimit`` per second, ``burstLimit``
   deep, per key), else 429 ``Too Many Requests``;
4. payload over 10 MB: 413;
5. a request validator with ``validateRequestBody``: the body must be JSON and satisfy the
   method's JSON-schema model (draft 4), else 400 ``Invalid request body`` plus the reason
   (what ``$context.error.validationErrorString`` holds on AWS);
6. the integration. Only ``AWS`` integrations with Kinesis ``PutRecords`` whose request
   template is clusterflow's telemetry template (first line ``## clusterflow-telemetry/v1``)
   are served: the fill does not run VTL, it applies that template's documented mapping
   (body ``{"records": [...]}`` -> one Kinesis record per element, data = the element's JSON,
   partition key = ``{run}-{rank}``, stream = the template's ``StreamName``). Kinesis errors
   (a record over 1 MiB, more than 500) come back as 400 with Kinesis's message and nothing
   is written, as the template's integration responses map them on AWS. Any other
   integration answers 500 naming the gap. The integration's IAM role is not checked.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from typing import Any
from urllib.parse import unquote

_APPLIED = False
TEMPLATE_MARKER = "## clusterflow-telemetry/v1"
MAX_PAYLOAD = 10 * 1024 * 1024
_PATH = re.compile(r"^/restapis/([^/]+)/([^/]+)/_user_request_(/.*)?$")
_HOST = re.compile(r"^([a-z0-9]+)\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(:\d+)?$")
_KINESIS_URI = re.compile(r"^arn:aws[a-z-]*:apigateway:([a-z0-9-]+):kinesis:action/PutRecords$")
_STREAM = re.compile(r'"StreamName"\s*:\s*"([^"$]+)"')
_buckets: dict[tuple[str, str], list[float]] = {}  # (plan, key) -> [tokens, last refill]
_bucket_lock = threading.Lock()


class _Answer(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message"))
        self.status, self.body = status, body


def _find_api(api_id: str) -> tuple[Any, Any]:
    from moto.apigateway.models import apigateway_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    for _, backend in apigateway_backends[DEFAULT_ACCOUNT_ID].items():
        if api_id in backend.apis:
            return backend, backend.apis[api_id]
    raise _Answer(403, {"message": "Forbidden"})


def _match(api: Any, path: str) -> tuple[Any, dict[str, str]]:
    want = [unquote(p) for p in path.strip("/").split("/") if p]
    for resource in api.resources.values():
        have = [p for p in resource.get_path().strip("/").split("/") if p]
        params: dict[str, str] = {}
        if have and have[-1].endswith("+}") and len(want) >= len(have):
            params[have[-1][1:-2]] = "/".join(want[len(have) - 1:])
            want_cmp, have_cmp = want[:len(have) - 1], have[:-1]
        else:
            want_cmp, have_cmp = want, have
        if len(want_cmp) != len(have_cmp):
            continue
        for h, w in zip(have_cmp, want_cmp, strict=True):
            if h.startswith("{") and h.endswith("}"):
                params[h[1:-1]] = w
            elif h != w:
                break
        else:
            return resource, params
    raise _Answer(403, {"message": "Missing Authentication Token"})


def _check_key(backend: Any, api: Any, stage: str, key: str | None) -> tuple[str, dict]:
    found = [k for k in backend.keys.values() if key and k.value == key and k.enabled]
    if found:
        for plan in backend.usage_plans.values():
            on_stage = any(s.get("apiId") == api.id and s.get("stage") == stage
                           for s in plan.api_stages)
            if on_stage and found[0].id in backend.usage_plan_keys.get(plan.id, {}):
                return plan.id, plan.throttle or {}
    raise _Answer(403, {"message": "Forbidden"})


def _throttle(plan_id: str, key: str, throttle: dict[str, Any]) -> None:
    rate = float(throttle.get("rateLimit") or 0)
    burst = float(throttle.get("burstLimit") or 0)
    if rate <= 0 and burst <= 0:
        return
    now = time.monotonic()
    with _bucket_lock:
        tokens, last = _buckets.get((plan_id, key), [burst or rate, now])
        tokens = min(burst or rate, tokens + (now - last) * rate)
        if tokens < 1:
            _buckets[(plan_id, key)] = [tokens, now]
            raise _Answer(429, {"message": "Too Many Requests"})
        _buckets[(plan_id, key)] = [tokens - 1, now]


def _validate(api: Any, method: Any, body: bytes, content_type: str) -> Any:
    validator = api.request_validators.get(method.request_validator_id or "")
    if validator is None or not validator.validate_request_body:
        return None
    try:
        doc = json.loads(body or b"null")
    except ValueError as e:
        raise _Answer(400, {"message": "Invalid request body",
                            "reason": f"body is not JSON: {e}"}) from None
    model_name = (method.request_models or {}).get(content_type) or (
        method.request_models or {}).get("application/json")
    model = api.models.get(model_name) if model_name else None
    if model is not None and model.schema:
        import jsonschema

        schema = json.loads(model.schema) if isinstance(model.schema, str) else model.schema
        errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(doc), key=str)
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(body)"
            raise _Answer(400, {"message": "Invalid request body",
                                "reason": f"{where}: {errors[0].message}"})
    return doc


def _kinesis_put(integration: Any, region: str, params: dict[str, str], doc: Any) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.exceptions import JsonRESTError
    from moto.kinesis.models import kinesis_backends

    template = (integration.request_templates or {}).get("application/json") or ""
    stream = _STREAM.search(template)
    if not template.startswith(TEMPLATE_MARKER) or stream is None:
        raise _Answer(500, {"message": "Internal server error", "reason": (
            "the embedded endpoint serves only clusterflow's telemetry mapping template "
            f"({TEMPLATE_MARKER}); it does not evaluate other VTL")})
    records = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(records, list):
        raise _Answer(400, {"message": "Invalid request body",
                            "reason": "records: expected a JSON array"})
    run = params.get("run", "")
    entries = []
    for r in records:
        data = json.dumps(r, separators=(",", ":")).encode()
        rank = r.get("rank", "") if isinstance(r, dict) else ""
        entries.append({"Data": base64.b64encode(data).decode(),
                        "PartitionKey": f"{run}-{rank}"})
    try:
        return kinesis_backends[DEFAULT_ACCOUNT_ID][region].put_records(
            stream_arn=None, stream_name=stream.group(1), records=entries)
    except JsonRESTError as e:
        raise _Answer(400, {"message": getattr(e, "message", str(e)),
                            "type": getattr(e, "error_type", "")}) from None


def handle(environ: dict[str, Any], api_id: str, stage: str, path: str) -> tuple[int, dict]:
    """Serve one stage request; returns (HTTP status, JSON body)."""
    try:
        backend, api = _find_api(api_id)
        if stage not in api.stages:
            raise _Answer(403, {"message": "Forbidden"})
        resource, params = _match(api, path or "/")
        verb = environ.get("REQUEST_METHOD", "GET").upper()
        method = resource.resource_methods.get(verb) or resource.resource_methods.get("ANY")
        if method is None:
            raise _Answer(403, {"message": "Missing Authentication Token"})
        if method.api_key_required:
            key = environ.get("HTTP_X_API_KEY")
            plan_id, throttle = _check_key(backend, api, stage, key)
            _throttle(plan_id, key or "", throttle)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > MAX_PAYLOAD:
            raise _Answer(413, {"message": "Request Too Long"})
        body = environ["wsgi.input"].read(length) if length else b""
        content_type = (environ.get("CONTENT_TYPE") or "application/json").split(";")[0]
        doc = _validate(api, method, body, content_type)
        if doc is None:
            try:
                doc = json.loads(body or b"null")
            except ValueError as e:
                raise _Answer(400, {"message": "Invalid request body",
                                    "reason": f"body is not JSON: {e}"}) from None
        integration = method.method_integration
        m = _KINESIS_URI.match(getattr(integration, "uri", "") or "")
        if integration is None or integration.integration_type != "AWS" or m is None:
            raise _Answer(500, {"message": "Internal server error", "reason": (
                "the embedded endpoint invokes only AWS integrations with Kinesis PutRecords")})
        return 200, _kinesis_put(integration, m.group(1), params, doc)
    except _Answer as a:
        return a.status, a.body


def _route(environ: dict[str, Any]) -> tuple[str, str, str] | None:
    path = environ.get("PATH_INFO", "")
    m = _PATH.match(path)
    if m:
        return m.group(1), m.group(2), m.group(3) or "/"
    h = _HOST.match((environ.get("HTTP_HOST") or "").lower())
    if h:
        stage, _, rest = path.lstrip("/").partition("/")
        return h.group(1), stage, "/" + rest
    return None


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error"}


def apply() -> None:
    """Serve stage requests in front of moto's dispatcher; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    original = DomainDispatcherApplication.__call__

    def __call__(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        target = _route(environ)
        if target is None:
            return original(self, environ, start_response)
        status, body = handle(environ, *target)
        payload = json.dumps(body).encode()
        start_response(f"{status} {_REASONS.get(status, 'Error')}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    DomainDispatcherApplication.__call__ = __call__
    _APPLIED = True
