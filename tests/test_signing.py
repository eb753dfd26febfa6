import httpx
import pytest

from payments.exceptions import PaymentConfigurationError
from payments.mpesa.auth import (
    MpesaAuth,
    decrypt_bearer_token,
    derive_bearer_token,
    load_public_key,
)

from .keys import rsa_key_pair


def test_token_decrypts_to_the_api_key_with_the_matching_private_key() -> None:
    private_key, der_b64, _ = rsa_key_pair()
    token = derive_bearer_token("my-api-key", der_b64)
    assert len(token) == 344  # base64 of a 2048-bit block, no line breaks
    assert "\n" not in token
    assert decrypt_bearer_token(token, private_key) == "my-api-key"


def test_pem_and_portal_forms_are_both_accepted() -> None:
    private_key, der_b64, pem = rsa_key_pair()
    for key in (der_b64, pem, pem.replace("\n", "\\n"), der_b64[:60] + "\n" + der_b64[60:]):
        assert decrypt_bearer_token(derive_bearer_token("k", key), private_key) == "k"


def test_padding_is_randomised_pkcs1v15() -> None:
    _, der_b64, _ = rsa_key_pair()
    assert derive_bearer_token("k", der_b64) != derive_bearer_token("k", der_b64)


@pytest.mark.parametrize("bad", ["", "not base64!", "QUJD", "-----BEGIN PUBLIC KEY-----\nxx\n"])
def test_bad_public_keys_name_the_variable(bad: str) -> None:
    with pytest.raises(PaymentConfigurationError, match="MPESA_PUBLIC_KEY"):
        load_public_key(bad)


def test_auth_derives_the_token_once_and_sets_the_header() -> None:
    private_key, der_b64, _ = rsa_key_pair()
    auth = MpesaAuth("secret-api-key", der_b64)
    first = next(auth.auth_flow(httpx.Request("GET", "https://example.test/")))
    second = next(auth.auth_flow(httpx.Request("GET", "https://example.test/")))
    header = first.headers["Authorization"]
    assert header == second.headers["Authorization"]
    assert header.startswith("Bearer ")
    assert decrypt_bearer_token(header.removeprefix("Bearer "), private_key) == "secret-api-key"
    assert "secret-api-key" not in repr(auth)
    assert auth.token not in repr(auth)
