import re
from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from payments.exceptions import PaymentValidationError
from payments.mpesa.values import (
    MSISDN_PATTERN,
    Msisdn,
    format_amount,
    mask_msisdn,
    parse_amount,
    validate_reference,
    validate_shortcode,
)


@pytest.mark.parametrize(
    "raw",
    [
        "841234567",
        "258841234567",
        "+258841234567",
        "00258841234567",
        "+258 84 123 4567",
        "84-123-4567",
        " 258 84 123 45 67 ",
        841234567,
    ],
)
def test_msisdn_normalises_every_common_form(raw: str | int) -> None:
    assert Msisdn(raw).digits == "258841234567"


@pytest.mark.parametrize(
    "raw",
    ["+841234567", "00841234567", "+84 123 4567", "0084-123-4567", "+851234567", "+1234567890"],
)
def test_msisdn_refuses_numbers_of_other_countries(raw: str) -> None:
    # "+" and "00" introduce a country code: +84… is Vietnam, not a local 84… (issue 9.9).
    with pytest.raises(PaymentValidationError):
        Msisdn(raw)


@pytest.mark.parametrize("raw", ["84\t1234567", "84\n1234567", "84_123_4567", "84/123/4567"])
def test_msisdn_separators_are_spaces_dashes_dots_and_parentheses_only(raw: str) -> None:
    # Exactly what the OpenAPI pattern (MSISDN_PATTERN) says.
    with pytest.raises(PaymentValidationError):
        Msisdn(raw)


def test_msisdn_pattern_matches_exactly_what_is_accepted() -> None:
    pattern = re.compile(MSISDN_PATTERN)
    for raw in [
        "841234567",
        "+258 84 123 4567",
        "(84) 123-4567",
        "0 0258 851234567",
        "+841234567",
        "0084123456",
        "821234567",
        "84.123.4567",
        "258841234567",
        "84\t1234567",
    ]:
        try:
            Msisdn(raw)
            accepted = True
        except PaymentValidationError:
            accepted = False
        assert bool(pattern.match(raw)) is accepted, raw


def test_msisdn_accepts_85_prefix() -> None:
    assert Msisdn("851234567").digits == "258851234567"


@pytest.mark.parametrize("raw", ["821234567", "258861234567", "+258871234567"])
def test_msisdn_rejects_other_operators_with_a_clear_message(raw: str) -> None:
    with pytest.raises(PaymentValidationError, match="not a Vodacom M-Pesa number") as info:
        Msisdn(raw)
    assert info.value.field == "phone_number"
    assert "1234567" not in info.value.message


@pytest.mark.parametrize(
    "raw", ["", "84123456", "8412345678", "2588412345678", "84123456a", "١٢٣٤٥٦٧٨٩", "+", True]
)
def test_msisdn_rejects_malformed_numbers(raw: object) -> None:
    with pytest.raises(PaymentValidationError):
        Msisdn(raw)  # type: ignore[arg-type]


def test_msisdn_masks_itself_everywhere() -> None:
    number = Msisdn("841234567")
    assert str(number) == "2588412*****"
    assert f"{number}" == "2588412*****"
    assert "258841234567" not in repr(number)
    assert mask_msisdn("258841234567") == "2588412*****"


def test_msisdn_in_pydantic_models_validates_and_serialises_masked() -> None:
    class Model(BaseModel):
        phone: Msisdn

    model = Model(phone="+258 84 123 4567")
    assert model.phone.digits == "258841234567"
    assert model.model_dump() == {"phone": "2588412*****"}
    with pytest.raises(ValidationError, match="Vodacom"):
        Model(phone="821234567")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (100, Decimal("100.00")),
        ("100.5", Decimal("100.50")),
        (Decimal("0.01"), Decimal("0.01")),
        (100.1, Decimal("100.10")),
    ],
)
def test_parse_amount_accepts_exact_cents(raw: object, expected: Decimal) -> None:
    amount = parse_amount(raw)
    assert amount == expected
    assert amount.as_tuple().exponent == -2


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (0, "greater than zero"),
        (-5, "greater than zero"),
        ("1.001", "2 decimal places"),
        (0.1 + 0.2, "2 decimal places"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
        ("abc", "number"),
        (True, "number"),
        (None, "number"),
        ([1], "number"),
    ],
)
def test_parse_amount_rejects_what_is_not_money(raw: object, reason: str) -> None:
    with pytest.raises(PaymentValidationError, match=reason):
        parse_amount(raw)


def test_parse_amount_applies_limits() -> None:
    limits = {"minimum": Decimal("1"), "maximum": Decimal("150000")}
    assert parse_amount("150000", **limits) == Decimal("150000.00")
    with pytest.raises(PaymentValidationError, match="at least 1.00"):
        parse_amount("0.99", **limits)
    with pytest.raises(PaymentValidationError, match="at most 150000.00"):
        parse_amount("150000.01", **limits)


def test_format_amount_is_two_decimals() -> None:
    assert format_amount(Decimal("10")) == "10.00"
    assert format_amount(Decimal("1234567.5")) == "1234567.50"


def test_references_follow_provider_limits() -> None:
    assert validate_reference("T12344C", field="ref") == "T12344C"
    assert validate_reference("A" * 20, field="ref") == "A" * 20
    for bad in ["", "A" * 21, "ORDER-1", " T1", "é1", "a b"]:
        with pytest.raises(PaymentValidationError):
            validate_reference(bad, field="ref")
    assert validate_shortcode("171717", field="code") == "171717"
    for bad in ["1717", "1717171", "17171a"]:
        with pytest.raises(PaymentValidationError):
            validate_shortcode(bad, field="code")
