"""A throwaway RSA key pair for tests, generated once per test session."""

import base64
from functools import lru_cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@lru_cache(maxsize=1)
def rsa_key_pair() -> tuple[rsa.RSAPrivateKey, str, str]:
    """(private key, public key as the portal's one-line base64 DER, public key as PEM)."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private_key.public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private_key, base64.b64encode(der).decode(), pem
