"""Who may call what: the API key guards /v1; the admin token guards adapter changes.

The contract the operator is built against:

- `/v1/*` with an API key set: `Authorization: Bearer` with the API key or the admin token
  (the operator reads /v1/models with its admin token). Without an API key: open.
- Loading and unloading adapters, with an admin token set: the admin token, or the API key
  when one is set; anything else is 401. Without an admin token (a server started by hand):
  403 unless upstream's `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is true, and then the API key when
  one is set (open otherwise, as upstream).

Tokens are compared in constant time as bytes: the header's raw bytes against the secret's
UTF-8 bytes, so a non-ASCII key works for a client that sends it as UTF-8.
"""

from __future__ import annotations

import hmac

from vllm_server.errors import ApiError
from vllm_server.settings import ADMIN_TOKEN_ENV, RUNTIME_LORA_ENV, Settings

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()


class Access:
    """The access rules of one server; holds its secrets as bytes and never shows them."""

    __slots__ = ("_admin_token", "_api_key", "_runtime_lora")

    def __init__(
        self, api_key: str | None, admin_token: str | None, allow_runtime_lora_updating: bool
    ) -> None:
        """Empty secrets are refused when settings are parsed; here they would mean "open"."""
        if api_key == "" or admin_token == "":
            raise ValueError("an empty API key or admin token is not a credential")
        self._api_key = api_key.encode() if api_key is not None else None
        self._admin_token = admin_token.encode() if admin_token is not None else None
        self._runtime_lora = allow_runtime_lora_updating

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        """The rules for these settings."""
        return cls(settings.api_key, settings.admin_token, settings.allow_runtime_lora_updating)

    def __repr__(self) -> str:
        """Which credentials are configured, not their values."""
        return (
            f"Access(api_key={'set' if self._api_key else 'unset'}, "
            f"admin_token={'set' if self._admin_token else 'unset'}, "
            f"allow_runtime_lora_updating={self._runtime_lora})"
        )

    @property
    def adapter_changes_open(self) -> bool:
        """Anyone may load and unload adapters (upstream's switch, and no credential set)."""
        return self._runtime_lora and self._api_key is None and self._admin_token is None

    def check_api(self, authorization: bytes | None) -> None:
        """Raise 401 unless a /v1 request may pass."""
        if self._api_key is None:
            return
        if not _matches(bearer_token(authorization), self._api_key, self._admin_token):
            raise ApiError(401, "Invalid or missing API key.", code="invalid_api_key", headers=_CHALLENGE)

    def check_adapter_change(self, authorization: bytes | None) -> None:
        """Raise 401 or 403 unless the caller may load or unload adapters."""
        token = bearer_token(authorization)
        if self._admin_token is not None:
            if not _matches(token, self._admin_token, self._api_key):
                also = " or the API key" if self._api_key is not None else ""
                raise ApiError(
                    401,
                    f"Loading and unloading LoRA adapters needs "
                    f"'Authorization: Bearer' with the admin token{also}.",
                    code="invalid_admin_token",
                    headers=_CHALLENGE,
                )
            return
        # Unauthenticated callers learn nothing about the switch: the API key comes first.
        self.check_api(authorization)
        if not self._runtime_lora:
            raise ApiError(
                403,
                f"Loading and unloading LoRA adapters at runtime is off. Set "
                f"{RUNTIME_LORA_ENV}=True to allow it (to API-key holders when a "
                f"key is set), or {ADMIN_TOKEN_ENV} to allow it to that token's "
                f"holder.",
                code="runtime_lora_updating_disabled",
            )


def _matches(token: bytes | None, *secrets: bytes | None) -> bool:
    """`token` equals one of the configured `secrets`; every one is compared (no early exit)."""
    if token is None:
        return False
    found = False
    for secret in secrets:
        if secret is not None:
            found |= hmac.compare_digest(token, secret)
    return found
