"""The only module that talks to the Kubernetes API server."""

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
from kubernetes.client.exceptions import ApiException

from vllm_operator.api import FIELD_MANAGER, GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")
Obj = Mapping[str, Any]

RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})
# (connect, read) seconds for one API call. Without them a server that accepts the connection
# and never answers blocks the handler forever; a timed-out call is retried like a lost one.
API_TIMEOUT = (5.0, 30.0)
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class TransientError(Exception):
    """The API server could not do it now; try again later."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def load_config() -> kubernetes.client.ApiClient:
    """An API client from KUBECONFIG, or the in-cluster service account."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        # The client reads $KUBECONFIG once, at import; pass it so that the current value counts.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
    return api_client(kubernetes.client.Configuration.get_default_copy())


def api_client(configuration: kubernetes.client.Configuration) -> kubernetes.client.ApiClient:
    """An API client that does not retry by itself: `with_retries` does, with backoff and a bound
    (urllib3's own 3 retries would quadruple every timeout, unseen)."""
    configuration.retries = 0
    return kubernetes.client.ApiClient(configuration)


def retry_after(exc: ApiException) -> float | None:
    header = (exc.headers or {}).get("Retry-After") if exc.headers else None
    try:
        return float(header) if header else None
    except ValueError:
        return None


def with_retries(
    call: Callable[[], T], attempts: int = 5, base: float = 0.2, retryable: frozenset[int] = RETRYABLE_STATUS
) -> T:
    """Run an API call, retrying conflicts, throttling, 5xx and lost connections with backoff."""
    for attempt in range(attempts):
        try:
            return call()
        except ApiException as exc:
            if exc.status not in retryable:
                raise
            delay = retry_after(exc) or base * 2**attempt
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
        """One API call with retries of the `retryable` statuses; raises ApiException on an HTTP error."""
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
                raise ApiException.from_response(http_resp=response, body=text, data=None)
            return json.loads(text) if text else None

        return with_retries(call, retryable=retryable)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", f"{PATHS[kind].format(namespace=namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
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
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
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
        after about `seconds`. Raises ApiException; 410 means the version is too old: list again."""
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
        # The read timeout outlives the server's own end of the watch: a silent connection is dead.
        response = self.api.call_api(
            "GET", url, header_params=signed, _request_timeout=(self.timeout[0], seconds + 30)
        )
        try:
            if not 200 <= response.status <= 299:
                response.read()  # type: ignore[no-untyped-call]
                raise ApiException.from_response(
                    http_resp=response, body=(response.data or b"").decode(), data=None
                )
            for line in _lines(response.response.stream(64 * 1024, decode_content=True)):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise ApiException(status=status.get("code", 500), reason=status.get("message", ""))
                yield str(event.get("type")), event.get("object") or {}
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
        except ApiException as exc:
            if exc.status in (409, 422):  # the test failed: someone else moved it first
                log.info("not scaling %s/%s: replicas are no longer %d", namespace, name, expect)
                return False
            raise
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
        except (ApiException, TransientError) as exc:
            # An event is a courtesy: losing one must not fail the reconcile.
            log.warning("could not post event %s on %s: %s", reason, meta["name"], exc)
