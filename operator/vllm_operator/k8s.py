"""The only module that talks to the Kubernetes API server (the only one importing its client).

Errors above this layer are ours: `APIError` and its subclasses by status, built from the
API server's Status body (code, reason, message clipped), and `TransientError` when the
server could not be reached or kept failing. The client library's ApiException never leaves
this module: its text carries the whole response body, which can echo what was sent (a
Secret's data) into a log or a condition.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import kubernetes
import urllib3

from vllm_operator.api import FIELD_MANAGER, GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")
Obj = Mapping[str, Any]

RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})
# (connect, read) seconds for one API call. Without them a server that accepts the connection
# and never answers blocks the handler forever; a timed-out call is retried like a lost one.
API_TIMEOUT = (5.0, 30.0)
CONNECTIONS = 32
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


# A Status message is one sentence; a longer one quotes what was sent.
MAX_MESSAGE = 512
# The longest Retry-After honoured (seconds); a longer or non-finite one falls back to backoff.
MAX_RETRY_AFTER = 60.0


class TransientError(Exception):
    """The API server could not do it now; try again later."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class ConfigError(Exception):
    """Neither an in-cluster service account nor a usable KUBECONFIG."""


class APIError(Exception):
    """The API server answered with an error status: its code, reason and message only."""

    def __init__(
        self, status: int, reason: str = "", message: str = "", retry_after: float | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message[:MAX_MESSAGE]
        self.retry_after = retry_after
        head = f"HTTP {status} {reason}".rstrip()
        super().__init__(f"{head}: {self.message}" if self.message else head)


class APIClientError(APIError):
    """4xx: this request will not succeed as it is."""


class APIForbiddenError(APIClientError):
    """403: RBAC, or a namespace being terminated (see the message)."""


class APINotFoundError(APIClientError):
    """404."""


class APIConflictError(APIClientError):
    """409: already exists, or a stale resourceVersion."""


class APIGoneError(APIClientError):
    """410: a watch's resourceVersion is too old; list again."""


class APIInvalidError(APIClientError):
    """400 or 422: the server refused what was sent (a child built from free-form fields)."""


class APIServerError(APIError):
    """5xx."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: APIInvalidError,
    403: APIForbiddenError,
    404: APINotFoundError,
    409: APIConflictError,
    410: APIGoneError,
    422: APIInvalidError,
}


def api_error(status: int, reason: str, body: str, headers: Mapping[str, str] | None = None) -> APIError:
    """The error of an HTTP answer, read from its Status body (or its first line if not JSON);
    whatever the body or a proxy in between holds, this returns an error and never raises."""
    message = ""
    try:
        parsed = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        message = str(parsed.get("message") or "")
        code = parsed.get("code")
        if not status:  # a watch's ERROR event carries its status only in the body
            status = code if isinstance(code, int) and 100 <= code <= 599 else 500
    elif body:
        message = body.splitlines()[0] if body.strip() else ""
    header = (headers or {}).get("Retry-After")
    try:
        retry_after: float | None = float(header) if header else None
    except ValueError:
        retry_after = None
    # A pause we would honour: NaN or infinity would crash or hang the retry's sleep.
    if retry_after is not None and not 0 <= retry_after <= MAX_RETRY_AFTER:
        retry_after = None
    cls = _BY_STATUS.get(status) or (APIServerError if status >= 500 else APIClientError)
    return cls(status, reason, message, retry_after)


def load_config() -> kubernetes.client.ApiClient:
    """An API client from the in-cluster service account, or KUBECONFIG; ConfigError if neither."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            # The client reads $KUBECONFIG once, at import; pass it so that the current value counts.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise ConfigError(str(exc)) from None
    return api_client(kubernetes.client.Configuration.get_default_copy())


def api_client(configuration: kubernetes.client.Configuration) -> kubernetes.client.ApiClient:
    """An API client that does not retry by itself: `with_retries` does, with backoff and a bound
    (urllib3's own 3 retries would quadruple every timeout, unseen)."""
    configuration.retries = 0
    # One pooled connection per thread that may call at once (kopf's 8 workers, the child
    # reconciles' threads, the loops): at the default 10, bursts discarded connections and
    # each new one cost a TLS handshake on both sides (bench-operator logged the discards).
    configuration.connection_pool_maxsize = CONNECTIONS
    return kubernetes.client.ApiClient(configuration)


def with_retries(
    call: Callable[[], T], attempts: int = 5, base: float = 0.2, retryable: frozenset[int] = RETRYABLE_STATUS
) -> T:
    """Run an API call, retrying conflicts, throttling, 5xx and lost connections with backoff."""
    for attempt in range(attempts):
        try:
            return call()
        except APIError as exc:
            if exc.status not in retryable:
                raise
            delay = exc.retry_after or base * 2**attempt
            reason = f"HTTP {exc.status} {exc.reason}"
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            delay, reason = base * 2**attempt, f"connection: {exc.__class__.__name__}"
        delay *= 1 + random.random() / 2  # jitter, so that many workers do not retry in step
        if attempt == attempts - 1:
            raise TransientError(f"API server unavailable after {attempts} attempts ({reason})", delay)
        log.info("retrying in %.2fs after %s", delay, reason)
        time.sleep(delay)
    raise AssertionError("unreachable")


PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments",
    "Service": "/api/v1/namespaces/{namespace}/services",
    "Pod": "/api/v1/namespaces/{namespace}/pods",
    "Event": "/api/v1/namespaces/{namespace}/events",
    "Secret": "/api/v1/namespaces/{namespace}/secrets",
    "VLLMModel": f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}",
}


def collection(kind: str, namespace: str | None) -> str:
    """The list path of a kind in one namespace, or in every namespace when None."""
    path = PATHS[kind]
    return (
        path.replace("/namespaces/{namespace}", "") if namespace is None else path.format(namespace=namespace)
    )


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())
    if buffer.strip():
        yield buffer


class KubeCluster:
    """`reconcile.Cluster` over the client's HTTP layer: plain dicts in, plain dicts out."""

    def __init__(self, api: kubernetes.client.ApiClient, timeout: tuple[float, float] = API_TIMEOUT) -> None:
        self.api = api
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        retryable: frozenset[int] = RETRYABLE_STATUS,
    ) -> Any:
        """One API call with retries of the `retryable` statuses; raises APIError on an HTTP error."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        # The client JSON-encodes bodies of JSON content types itself; YAML ones (apply) go as text.
        payload = json.dumps(body) if body is not None and content_type == APPLY else body

        def call() -> Any:
            _, url, signed, _, _ = self.api.param_serialize(
                method,
                path,
                query_params=list((query or {}).items()),
                header_params=dict(headers),
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(
                method, url, header_params=signed, body=payload, _request_timeout=self.timeout
            )
            response.read()  # type: ignore[no-untyped-call]
            text = response.data.decode() if response.data else ""
            if not 200 <= response.status <= 299:
                raise api_error(response.status, response.reason or "", text, response.headers)
            return json.loads(text) if text else None

        return with_retries(call, retryable=retryable)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", f"{PATHS[kind].format(namespace=namespace)}/{name}")
        except APINotFoundError:
            return None
        return result

    def create(self, manifest: Obj) -> bool:
        """POST an object; False when one of that name exists. Needs only the `create` verb, which
        is all the operator may do to Secrets: it never reads or changes one."""
        meta = manifest["metadata"]
        try:
            # A create's 409 is "already exists", an answer, not a conflict worth retrying.
            self.request(
                "POST",
                PATHS[manifest["kind"]].format(namespace=meta["namespace"]),
                body=dict(manifest),
                retryable=RETRYABLE_STATUS - {409},
            )
        except APIConflictError:
            return False
        log.info("created %s %s/%s", manifest["kind"], meta["namespace"], meta["name"])
        return True

    def apply(self, manifest: Obj) -> dict[str, Any]:
        kind, meta = manifest["kind"], manifest["metadata"]
        log.info("applying %s %s/%s", kind, meta["namespace"], meta["name"])
        result: dict[str, Any] = self.request(
            "PATCH",
            f"{PATHS[kind].format(namespace=meta['namespace'])}/{meta['name']}",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=manifest,
            content_type=APPLY,
        )
        return result

    def list_pods(self, namespace: str, selector: str) -> Sequence[dict[str, Any]]:
        result = self.request(
            "GET", PATHS["Pod"].format(namespace=namespace), query={"labelSelector": selector}
        )
        return result.get("items", [])  # type: ignore[no-any-return]

    def list(self, kind: str, namespace: str | None, selector: str = "") -> tuple[list[dict[str, Any]], str]:
        """Every object of a kind (matching `selector`) and the list's resourceVersion to watch from."""
        result = self.request(
            "GET", collection(kind, namespace), query={"labelSelector": selector} if selector else {}
        )
        return result.get("items") or [], str((result.get("metadata") or {}).get("resourceVersion", ""))

    def watch(
        self, kind: str, namespace: str | None, selector: str, resource_version: str, seconds: int = 240
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The changes after `resource_version` as (type, object) until the server ends the watch
        after about `seconds`. Raises APIError (APIGoneError: the version is too old, list again)
        or TransientError (the connection failed or broke)."""
        query: dict[str, Any] = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": seconds,
        }
        if selector:
            query["labelSelector"] = selector
        _, url, signed, _, _ = self.api.param_serialize(
            "GET",
            collection(kind, namespace),
            query_params=list(query.items()),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            # The read timeout outlives the server's own end of the watch: a silent connection is dead.
            response = self.api.call_api(
                "GET", url, header_params=signed, _request_timeout=(self.timeout[0], seconds + 30)
            )
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            raise TransientError(f"watch: {exc.__class__.__name__}", 1.0) from None
        try:
            if not 200 <= response.status <= 299:
                response.read()  # type: ignore[no-untyped-call]
                body = (response.data or b"").decode("utf-8", "replace")
                raise api_error(response.status, response.reason or "", body, response.headers)
            for line in _lines(response.response.stream(64 * 1024, decode_content=True)):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise api_error(0, str(status.get("reason") or ""), json.dumps(status))
                yield str(event.get("type")), event.get("object") or {}
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            raise TransientError(f"watch broke: {exc.__class__.__name__}", 1.0) from None
        finally:
            response.response.release_conn()

    def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> None:
        # A merge patch keeps keys it does not mention: null out the ones we dropped.
        body: dict[str, Any] = {key: None for key in previous if key not in status}
        body.update(status)
        log.info("writing status of %s/%s: phase %s", namespace, name, status.get("phase"))
        self.request(
            "PATCH",
            f"{PATHS['VLLMModel'].format(namespace=namespace)}/{name}/status",
            body={"status": body},
            content_type=MERGE,
        )

    def patch_status(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        """Merge `fields` into a model's status, leaving every other key as it is."""
        self.request(
            "PATCH",
            f"{PATHS['VLLMModel'].format(namespace=namespace)}/{name}/status",
            body={"status": dict(fields)},
            content_type=MERGE,
        )

    def scale(self, namespace: str, name: str, replicas: int, expect: int) -> bool:
        """Set a model's `spec.replicas` through its scale subresource, only if it is `expect`
        now (a JSON patch test): False when it is not, so two writers never both act on one
        reading (the autoscaler and the router waking a model at zero)."""
        try:
            self.request(
                "PATCH",
                f"{PATHS['VLLMModel'].format(namespace=namespace)}/{name}/scale",
                # A Scale's spec omits replicas when it is 0 (omitempty): then the test is on
                # the empty spec, and "add" (not "replace") sets the missing key.
                body=[
                    {"op": "test", "path": "/spec/replicas", "value": expect}
                    if expect
                    else {"op": "test", "path": "/spec", "value": {}},
                    {"op": "add", "path": "/spec/replicas", "value": replicas},
                ],
                content_type=JSON_PATCH,
                retryable=RETRYABLE_STATUS - {409},
            )
        except (APIConflictError, APIInvalidError):  # the test failed: someone else moved it first
            log.info("not scaling %s/%s: replicas are no longer %d", namespace, name, expect)
            return False
        log.info("scaled %s/%s from %d to %d replicas", namespace, name, expect, replicas)
        return True

    def event(self, owner: Obj, kind: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": owner.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": owner.get("kind", "VLLMModel"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", PATHS["Event"].format(namespace=meta["namespace"]), body=body)
        except (APIError, TransientError) as exc:
            # An event is a courtesy: losing one must not fail the reconcile.
            log.warning("could not post event %s on %s: %s", reason, meta["name"], exc)
