from decimal import Decimal

import pytest

from payments.config import get_settings, load_settings
from payments.exceptions import PaymentConfigurationError
from payments.simulator.keys import SIMULATOR_API_KEY

from .keys import rsa_key_pair


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No variable or .env file of the developer's machine leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith(("MPESA_", "PAYMENT_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()


def test_simulator_environment_needs_no_credentials() -> None:
    settings = load_settings(mpesa_environment="simulator")
    assert settings.api_key == SIMULATOR_API_KEY
    assert settings.mpesa_service_provider_code == "171717"
    assert settings.payment_c2b_timeout == 120
    assert settings.payment_request_timeout == 30
    assert settings.payment_log_dir == "logs"
    assert settings.mpesa_origin == "developer.mpesa.vm.co.mz"


def test_reads_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    _, der_b64, _ = rsa_key_pair()
    monkeypatch.setenv("MPESA_ENVIRONMENT", "production")
    monkeypatch.setenv("MPESA_API_KEY", "abc123")
    monkeypatch.setenv("MPESA_PUBLIC_KEY", der_b64)
    monkeypatch.setenv("MPESA_SERVICE_PROVIDER_CODE", "900579")
    monkeypatch.setenv("PAYMENT_MAX_AMOUNT", "5000")
    monkeypatch.setenv("PAYMENT_C2B_TIMEOUT", "95")
    settings = get_settings()
    assert settings.mpesa_environment == "production"
    assert settings.api_key == "abc123"
    assert settings.payment_max_amount == Decimal("5000")
    assert settings.payment_c2b_timeout == 95
    assert "abc123" not in repr(settings)


def test_reads_a_dotenv_file(tmp_path) -> None:
    (tmp_path / ".env").write_text("MPESA_ENVIRONMENT=simulator\nPAYMENT_MIN_AMOUNT=5\n")
    assert get_settings().payment_min_amount == Decimal("5")


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"mpesa_environment": "sandbox"}, "MPESA_API_KEY"),
        ({"mpesa_environment": "production", "mpesa_api_key": "k"}, "MPESA_PUBLIC_KEY"),
        (
            {"mpesa_environment": "sandbox", "mpesa_api_key": "k", "mpesa_public_key": "nope"},
            "MPESA_PUBLIC_KEY",
        ),
        ({"mpesa_environment": "staging"}, "MPESA_ENVIRONMENT"),
        (
            {
                "mpesa_environment": "simulator",
                "payment_min_amount": "10",
                "payment_max_amount": "5",
            },
            "PAYMENT_MIN_AMOUNT",
        ),
        (
            {"mpesa_environment": "simulator", "mpesa_service_provider_code": "1717"},
            "MPESA_SERVICE_PROVIDER_CODE",
        ),
        (
            {"mpesa_environment": "simulator", "mpesa_service_provider_code": "17171a"},
            "MPESA_SERVICE_PROVIDER_CODE",
        ),
        (
            {"mpesa_environment": "simulator", "mpesa_base_url": "http://proxy.example.com"},
            "MPESA_BASE_URL",
        ),
        ({"mpesa_environment": "simulator", "mpesa_base_url": "ftp://127.0.0.1"}, "MPESA_BASE_URL"),
        (
            {"mpesa_environment": "simulator", "mpesa_response_code_overrides": "{bad json"},
            "MPESA_RESPONSE_CODE_OVERRIDES",
        ),
        ({"mpesa_environment": "simulator", "payment_c2b_timeout": "0"}, "PAYMENT_C2B_TIMEOUT"),
    ],
)
def test_misconfiguration_fails_fast_naming_the_variable(overrides: dict, variable: str) -> None:
    with pytest.raises(PaymentConfigurationError) as info:
        load_settings(**overrides)
    assert variable in info.value.message


def test_base_url_allows_http_only_on_loopback() -> None:
    for url in ("http://127.0.0.1:8001", "http://localhost:9000/", "https://proxy.example.com"):
        settings = load_settings(mpesa_environment="simulator", mpesa_base_url=url)
        assert settings.mpesa_base_url == url.rstrip("/")


def test_secret_values_lists_api_key_and_credential() -> None:
    settings = load_settings(
        mpesa_environment="simulator", mpesa_api_key="key-1", mpesa_security_credential="cred-1"
    )
    assert set(settings.secret_values()) == {"key-1", "cred-1"}
