"""Bearer tokens for the M-Pesa Mozambique API.

The token is base64(RSA PKCS#1 v1.5 encryption of the API key with the portal's public key). There
is no token endpoint and no expiry, so a token is derived once per key and reused. Tokens are never
logged: ``MpesaAuth`` is the only place that holds one.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Generator

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..exceptions import PaymentConfigurationError


def load_public_key(text: str, *, variable: str = "MPESA_PUBLIC_KEY") -> rsa.RSAPublicKey:
    """Load the portal key: single-line base64 DER (as the portal shows it) or PEM."""
    cleaned = (text or "").strip()
    if not cleaned:
        raise PaymentConfigurationError(f"{variable} is empty", details={"variable": variable})
    try:
        if cleaned.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(cleaned.replace("\\n", "\n").encode())
        else:
            der = base64.b64decode("".join(cleaned.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, TypeError) as exc:
        raise PaymentConfigurationError(
            f"{variable} is not a valid RSA public key (expected the portal's base64 key or PEM)",
            details={"variable": variable},
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise PaymentConfigurationError(
            f"{variable} is not an RSA public key", details={"variable": variable}
        )
    return key


def derive_bearer_token(api_key: str, public_key: str | rsa.RSAPublicKey) -> str:
    key = load_public_key(public_key) if isinstance(public_key, str) else public_key
    encrypted = key.encrypt(api_key.encode("utf-8"), padding.PKCS1v15())
    return base64.b64encode(encrypted).decode("ascii")


def decrypt_bearer_token(token: str, private_key: rsa.RSAPrivateKey) -> str:
    """The server side of the scheme (used by the simulator): token → API key."""
    return private_key.decrypt(base64.b64decode(token), padding.PKCS1v15()).decode("utf-8")


class MpesaAuth(httpx.Auth):
    """Sets ``Authorization: Bearer <token>``; the token is derived once, on first use."""

    def __init__(self, api_key: str, public_key: str) -> None:
        self._api_key = api_key
        self._public_key = load_public_key(public_key)
        self._token: str | None = None

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = derive_bearer_token(self._api_key, self._public_key)
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request

    def __repr__(self) -> str:
        return "MpesaAuth(api_key=***, token=***)"
