"""The simulator's side of M-Pesa authentication: RSA bearer tokens, and the Origin check."""

from __future__ import annotations

import base64
import hmac

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..mpesa.auth import decrypt_bearer_token
from .config import SimulatorConfig
from .wire import CODES

__all__ = ["ALLOWED_ORIGINS", "BearerTokens", "auth_refusal", "public_key_base64"]

ALLOWED_ORIGINS = frozenset({"developer.mpesa.vm.co.mz", "*"})

_TOKEN_CACHE_LIMIT = 4096


class BearerTokens:
    """Decrypts bearer tokens with the configured private key; both are cached, since RSA
    decryption is slow and clients send the same token on every call."""

    def __init__(self) -> None:
        self._private_key: rsa.RSAPrivateKey | None = None
        self._private_key_pem: str | None = None
        self._decrypted_tokens: dict[str, str] = {}

    def private_key(self, pem: str) -> rsa.RSAPrivateKey:
        if self._private_key is None or self._private_key_pem != pem:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("the simulator's private key must be an RSA key")
            self._private_key = key
            self._private_key_pem = pem
            self._decrypted_tokens.clear()
        return self._private_key

    def api_key(self, token: str, pem: str) -> str | None:
        """The API key the token encrypts; None if it does not decrypt with this key."""
        private_key = self.private_key(pem)
        cached = self._decrypted_tokens.get(token)
        if cached is not None:
            return cached
        try:
            api_key = decrypt_bearer_token(token, private_key)
        except (ValueError, TypeError):
            return None
        if len(self._decrypted_tokens) >= _TOKEN_CACHE_LIMIT:
            self._decrypted_tokens.clear()
        self._decrypted_tokens[token] = api_key
        return api_key


def public_key_base64(private_key: rsa.RSAPrivateKey) -> str:
    """The public half as single-line base64 DER, the form the Vodacom portal shows."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def _code_only(code: str) -> JSONResponse:
    entry = CODES.lookup(code)
    return JSONResponse(
        {"output_ResponseCode": entry.code, "output_ResponseDesc": entry.description},
        status_code=entry.http_status,
    )


def auth_refusal(
    request: Request, config: SimulatorConfig, tokens: BearerTokens
) -> Response | None:
    """The answer refusing the request's credentials (INS-2, INS-26); None if they pass."""
    if config.refusal_output_error:
        return JSONResponse({"output_error": config.refusal_output_error}, status_code=401)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    api_key = (
        tokens.api_key(token, config.private_key_pem)
        if scheme.lower() == "bearer" and token
        else None
    )
    if api_key is None or not hmac.compare_digest(
        api_key.encode("utf-8"), config.api_key.encode("utf-8")
    ):
        return _code_only("INS-2")
    if config.check_origin and request.headers.get("origin") not in ALLOWED_ORIGINS:
        return _code_only("INS-26")
    return None
