"""The only module that talks to the Kubernetes API server (the only one importing its client).

Every call is a coroutine on the caller's event loop (aiohttp); the `kubernetes` package only
loads the configuration (in-cluster or KUBECONFIG) that the address, TLS and token come from.

Errors above this layer are ours: `APIError` and its subclasses by status, built from the
API server's Status body (code, reason, message clipped), and `TransientError` when the
server could not be reached or kept failing. No HTTP library's exception leaves this module:
the client library's ApiException carried the whole response body, which can echo what was
sent (a Secret's data) into a log or a condition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import kubernetes

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


def load_config() -> kubernetes.client.Configuration:
    """The API server's address and credentials from the in-cluster service account, or
    KUBECONFIG; ConfigError if neither."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            # The client reads $KUBECONFIG once, at import; pass it so that the current value counts.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise ConfigError(str(exc)) from None
    return kubernetes.client.Configuration.get_default_copy()


def ssl_context(configuration: kubernetes.client.Configuration) -> ssl.SSLContext:
    """The TLS settings the client library would use: the CA, the client certificate, and
    verification unless the kubeconfig turns it off."""
    context = ssl.create_default_context(
        cafile=configuration.ssl_ca_cert or None, cadata=configuration.ca_cert_data or None
    )
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif configuration.assert_hostname is False:
        context.check_hostname = False
    return context


# What a lost or broken connection raises: aiohttp's own errors (connect, TLS, a dropped
# connection, a read timeout) and the OS's and asyncio's timeouts underneath them.
CONNECTION_ERRORS = (aiohttp.ClientError, ConnectionError, TimeoutError)


async def with_retries(
    call: Callable[[], Awaitable[T]],
    attempts: int = 5,
    base: float = 0.2,
    retryable: frozenset[int] = RETRYABLE_STATUS,
) -> T:
    """Run an API call, retrying conflicts, throttling, 5xx and lost connections with backoff."""
    for attempt in range(attempts):
        try:
            return await call()
        except APIError as exc:
            if exc.status not in retryable:
                raise
            delay = exc.retry_after or base * 2**attempt
            reason = f"HTTP {exc.status} {exc.reason}"
        except CONNECTION_ERRORS as exc:
            delay, reason = base * 2**attempt, f"connection: {exc.__class__.__name__}"
        delay *= 1 + random.random() / 2  # jitter, so that many callers do not retry in step
        if attempt == attempts - 1:
            raise TransientError(f"API server unavailable after {attempts} attempts ({reason})", delay)
        log.info("retrying in %.2fs after %s", delay, reason)
        await asyncio.sleep(delay)
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


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-empty lines of a stream, however long (aiohttp's own line reader refuses lines
    over 128 KiB, which a big object's watch event can be)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class KubeCluster:
    """`reconcile.Cluster` over aiohttp: plain dicts in, plain dicts out, on the caller's event loop.

    Build it anywhere; its HTTP sessions are made on first use, inside the running loop (an
    aiohttp session belongs to the loop that made it). `close()` (or `async with`) ends them.
    """

    def __init__(
        self, configuration: kubernetes.client.Configuration, timeout: tuple[float, float] = API_TIMEOUT
    ) -> None:
        self.configuration = configuration
        self.host = str(configuration.host).rstrip("/")
        self.timeout = timeout
        self.ssl: ssl.SSLContext | bool = (
            ssl_context(configuration) if self.host.startswith("https") else False
        )
        self.server_hostname: str | None = configuration.tls_server_name or None
        self.proxy: str | None = configuration.proxy or None
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeCluster:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    def _calls(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # CONNECTIONS at once: enough for every reconcile, scrape write and scale a busy
            # operator has in flight; more wait for a free one rather than open a connection
            # (and a TLS handshake on both sides) each.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONNECTIONS, ssl=self.ssl)
            )
        return self._session

    def _watches(self) -> aiohttp.ClientSession:
        if self._watch_session is None or self._watch_session.closed:
            # A watch holds its connection for minutes: its own unbounded pool, so that watches
            # never take the calls' connections.
            self._watch_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=self.ssl))
        return self._watch_session

    def _headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """`headers` and the bearer token, read per request: the in-cluster config's refresh hook
        renews a projected service-account token that expires."""
        out = dict(headers)
        token = self.configuration.auth_settings().get("BearerToken")
        if token and token.get("value"):
            out["Authorization"] = str(token["value"])
        return out

    async def request(
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
        # JSON is YAML, so an apply's body is JSON too.
        payload = json.dumps(body).encode() if body is not None else None
        # (connect, read): a server that accepts the connection and never answers times out.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout[0], sock_read=self.timeout[1])

        async def call() -> Any:
            headers = self._headers({"Accept": "application/json", "Content-Type": content_type})
            async with self._calls().request(
                method,
                self.host + path,
                params={key: str(value) for key, value in (query or {}).items()},
                data=payload,
                headers=headers,
                timeout=timeout,
                server_hostname=self.server_hostname,
                proxy=self.proxy,
            ) as response:
                data = await response.read()
                if not 200 <= response.status <= 299:
                    text = data.decode("utf-8", "replace")
                    raise api_error(response.status, response.reason or "", text, response.headers)
                return json.loads(data) if data else None

        return await with_retries(call, retryable=retryable)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.request(
                "GET", f"{PATHS[kind].format(namespace=namespace)}/{name}"
            )
        except APINotFoundError:
            return None
        return result

    async def create(self, manifest: Obj) -> bool:
        """POST an object; False when one of that name exists. Needs only the `create` verb, which
        is all the operator may do to Secrets: it never reads or changes one."""
        meta = manifest["metadata"]
        try:
            # A create's 409 is "already exists", an answer, not a conflict worth retrying.
            await self.request(
                "POST",
                PATHS[manifest["kind"]].format(namespace=meta["namespace"]),
                body=dict(manifest),
                retryable=RETRYABLE_STATUS - {409},
            )
        except APIConflictError:
            return False
        log.info("created %s %s/%s", manifest["kind"], meta["namespace"], meta["name"])
        return True

    async def apply(self, manifest: Obj) -> dict[str, Any]:
        kind, meta = manifest["kind"], manifest["metadata"]
        log.info("applying %s %s/%s", kind, meta["namespace"], meta["name"])
        result: dict[str, Any] = await self.request(
            "PATCH",
            f"{PATHS[kind].format(namespace=meta['namespace'])}/{meta['name']}",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=manifest,
            content_type=APPLY,
        )
        return result

    async def list_pods(self, namespace: str, selector: str) -> Sequence[dict[str, Any]]:
        result = await self.request(
            "GET", PATHS["Pod"].format(namespace=namespace), query={"labelSelector": selector}
        )
        return result.get("items", [])  # type: ignore[no-any-return]

    async def list(
        self, kind: str, namespace: str | None, selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of a kind (matching `selector`) and the list's resourceVersion to watch from."""
        result = await self.request(
            "GET", collection(kind, namespace), query={"labelSelector": selector} if selector else {}
        )
        return result.get("items") or [], str((result.get("metadata") or {}).get("resourceVersion", ""))

    async def watch(
        self, kind: str, namespace: str | None, selector: str, resource_version: str, seconds: int = 240
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The changes after `resource_version` as (type, object) until the server ends the watch
        after about `seconds`. Raises APIError (APIGoneError: the version is too old, list again)
        or TransientError (the connection failed or broke)."""
        query: dict[str, str] = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        if selector:
            query["labelSelector"] = selector
        # The read timeout outlives the server's own end of the watch: a silent connection is dead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout[0], sock_read=seconds + 30)
        try:
            response = await self._watches().get(
                self.host + collection(kind, namespace),
                params=query,
                headers=self._headers({"Accept": "application/json"}),
                timeout=timeout,
                server_hostname=self.server_hostname,
                proxy=self.proxy,
            )
        except CONNECTION_ERRORS as exc:
            raise TransientError(f"watch: {exc.__class__.__name__}", 1.0) from None
        try:
            if not 200 <= response.status <= 299:
                body = (await response.read()).decode("utf-8", "replace")
                raise api_error(response.status, response.reason or "", body, response.headers)
            async for line in _lines(response.content.iter_any()):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise api_error(0, str(status.get("reason") or ""), json.dumps(status))
                yield str(event.get("type")), event.get("object") or {}
        except CONNECTION_ERRORS as exc:
            raise TransientError(f"watch broke: {exc.__class__.__name__}", 1.0) from None
        finally:
            response.release()

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> dict[str, Any]:
        # A merge patch keeps keys it does not mention: null out the ones we dropped.
        body: dict[str, Any] = {key: None for key in previous if key not in status}
        body.update(status)
        log.info("writing status of %s/%s: phase %s", namespace, name, status.get("phase"))
        written: dict[str, Any] = await self.request(
            "PATCH",
            f"{PATHS['VLLMModel'].format(namespace=namespace)}/{name}/status",
            body={"status": body},
            content_type=MERGE,
        )
        return written

    async def patch_status(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        """Merge `fields` into a model's status, leaving every other key as it is."""
        await self.request(
            "PATCH",
            f"{PATHS['VLLMModel'].format(namespace=namespace)}/{name}/status",
            body={"status": dict(fields)},
            content_type=MERGE,
        )

    async def scale(self, namespace: str, name: str, replicas: int, expect: int) -> bool:
        """Set a model's `spec.replicas` through its scale subresource, only if it is `expect`
        now (a JSON patch test): False when it is not, so two writers never both act on one
        reading (the autoscaler and the router waking a model at zero)."""
        try:
            await self.request(
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

    async def event(self, owner: Obj, kind: str, reason: str, message: str) -> None:
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
            await self.request("POST", PATHS["Event"].format(namespace=meta["namespace"]), body=body)
        except (APIError, TransientError) as exc:
            # An event is a courtesy: losing one must not fail the reconcile.
            log.warning("could not post event %s on %s: %s", reason, meta["name"], exc)
