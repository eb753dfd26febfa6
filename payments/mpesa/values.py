"""Typed input values: Vodacom MSISDNs, amounts in MZN and provider references."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from ..exceptions import PaymentValidationError

#: Spaces, dashes, dots and parentheses may separate the digits (``+258 84 123 4567``,
#: ``(84) 123-4567``); nothing else.
_SEPARATORS = re.compile(r"[ \-().]")
_SEP = r"[ ().-]*"
#: Every spelling ``Msisdn`` accepts, as one (ECMA- and Python-compatible) pattern for the
#: OpenAPI document.
MSISDN_PATTERN = (
    rf"^{_SEP}(?:(?:\+|0{_SEP}0){_SEP}2{_SEP}5{_SEP}8|2{_SEP}5{_SEP}8)?"
    rf"{_SEP}8{_SEP}[45](?:{_SEP}[0-9]){{7}}{_SEP}$"
)
_VODACOM_MSISDN = re.compile(r"^2588[45]\d{7}$")
_ANY_MZ_MOBILE = re.compile(r"^2588\d{8}$")
_REFERENCE = re.compile(r"^[A-Za-z0-9]+$")
#: M-Pesa's own IDs (transaction and conversation IDs) as they come back and are sent back:
#: letters, digits and the ``_`` (and ``-``) of the portal's ``AG_20180206_00005e7dccc6da08efa8``.
PROVIDER_ID_PATTERN = r"[A-Za-z0-9_-]{1,100}"
PROVIDER_ID = re.compile(PROVIDER_ID_PATTERN)
_AMOUNT_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]{1,2})?", re.ASCII)
CENT = Decimal("0.01")
#: What ``money_text`` writes: an optional minus, digits, a point and exactly two decimals.
MONEY_TEXT_PATTERN = r"^-?[0-9]+\.[0-9]{2}$"
#: What a Numeric(12, 2) column holds; no M-Pesa amount comes near it.
MAX_AMOUNT = Decimal("10000000000")


def mask_msisdn(digits: str) -> str:
    """``258841234567`` → ``2588412*****``: keep the country code, operator and two digits."""
    if len(digits) <= 7:
        return "*" * len(digits)
    return digits[:7] + "*" * (len(digits) - 7)


class Msisdn:
    """A Vodacom Mozambique mobile number, normalised to ``2588[45]XXXXXXX``.

    ``str()``, ``repr()`` and f-strings show the masked form, so a number cannot leak into a log or
    an error by accident; the full digits are only available as ``.digits``.
    """

    __slots__ = ("digits",)

    def __init__(self, raw: str | int) -> None:
        self.digits = self.normalize(raw)

    @staticmethod
    def normalize(raw: str | int) -> str:
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise PaymentValidationError("phone number must be a string", field="phone_number")
        text = _SEPARATORS.sub("", str(raw))
        # "+" and "00" introduce a country code, which must be Mozambique's (258): "+841234567"
        # is a number in another country, not a local one.
        international = text.startswith(("+", "00"))
        text = text[1:] if text.startswith("+") else text[2:] if international else text
        if not text.isdigit() or not text.isascii():
            raise PaymentValidationError(
                "phone number may only contain digits, spaces, dashes and a leading + or 00",
                field="phone_number",
            )
        if len(text) == 9 and not international:
            text = "258" + text
        if _VODACOM_MSISDN.match(text):
            return text
        if _ANY_MZ_MOBILE.match(text):
            raise PaymentValidationError(
                f"phone number {mask_msisdn(text)} is not a Vodacom M-Pesa number"
                " (it must start with 84 or 85)",
                field="phone_number",
            )
        raise PaymentValidationError(
            "phone number must be a Mozambican Vodacom number: 84XXXXXXX or 85XXXXXXX,"
            " optionally with 258, +258 or 00258 in front",
            field="phone_number",
        )

    @property
    def masked(self) -> str:
        return mask_msisdn(self.digits)

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"Msisdn({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Msisdn) and other.digits == self.digits

    def __hash__(self) -> int:
        return hash(self.digits)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any) -> Msisdn:
            if isinstance(value, Msisdn):
                return value
            try:
                return cls(value)
            except PaymentValidationError as exc:
                raise ValueError(exc.message) from None

        return core_schema.no_info_plain_validator_function(
            validate,
            json_schema_input_schema=core_schema.str_schema(pattern=MSISDN_PATTERN),
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value: value.masked, when_used="always"
            ),
        )


def parse_amount(
    value: Any,
    *,
    minimum: Decimal | None = None,
    maximum: Decimal | None = None,
    field: str = "amount",
) -> Decimal:
    """Parse a money amount to a two-place ``Decimal``, refusing anything that is not exact cents.

    Accepts ``int``, ``str`` and ``Decimal``, and floats that are exactly cents (``100.1`` but not
    ``0.1 + 0.2``). NaN, infinity, booleans, zero, negatives and more than two decimals are errors.
    """
    if isinstance(value, bool) or value is None:
        raise PaymentValidationError("amount must be a number", field=field)
    try:
        if isinstance(value, float):
            amount = Decimal(repr(value))
        elif isinstance(value, int | Decimal):
            amount = Decimal(value)
        elif isinstance(value, str):
            # Decimal() also takes "10_0", exponents and non-ASCII digits; an amount is plain
            # ASCII digits with at most one "." and two decimals.
            text = value
            if not _AMOUNT_TEXT.fullmatch(text):
                raise PaymentValidationError(
                    "amount must be a finite number: ASCII digits with at most one '.' and"
                    " 2 decimal places",
                    field=field,
                )
            amount = Decimal(text)
        else:
            raise PaymentValidationError("amount must be a number", field=field)
    except InvalidOperation:
        raise PaymentValidationError("amount must be a number", field=field) from None
    if not amount.is_finite():
        raise PaymentValidationError("amount must be a finite number", field=field)
    if amount <= 0:
        raise PaymentValidationError("amount must be greater than zero", field=field)
    if amount >= MAX_AMOUNT:  # beyond Numeric(12, 2), and quantize() would overflow
        raise PaymentValidationError(f"amount must be less than {MAX_AMOUNT:,.0f}", field=field)
    if amount != amount.quantize(CENT):
        raise PaymentValidationError("amount may have at most 2 decimal places", field=field)
    amount = amount.quantize(CENT)
    if minimum is not None and amount < minimum:
        raise PaymentValidationError(f"amount must be at least {minimum:.2f}", field=field)
    if maximum is not None and amount > maximum:
        raise PaymentValidationError(f"amount must be at most {maximum:.2f}", field=field)
    return amount


def money_text(amount: Decimal | int) -> str:
    """Money as it leaves the module, everywhere (API answers, CSV, event payloads, M-Pesa's
    ``input_Amount``): the exact decimal with two places, ``"100.00"``. Never through a float,
    so a float is refused rather than rounded."""
    if isinstance(amount, float | bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"money must be a Decimal or an int, not {type(amount).__name__}")
    value = Decimal(amount)
    if not value.is_finite():
        raise ValueError("money must be finite")
    return f"{value.quantize(CENT):f}"


#: The wire form of an amount for M-Pesa (the same text as every other money value).
format_amount = money_text


def validate_reference(value: str, *, field: str, max_length: int = 20) -> str:
    """Provider references: 1..max_length letters and digits, nothing else (INS-17/INS-19)."""
    if not isinstance(value, str) or not value:
        raise PaymentValidationError(f"{field} is required", field=field)
    if len(value) > max_length:
        raise PaymentValidationError(
            f"{field} must be at most {max_length} characters", field=field
        )
    if not _REFERENCE.match(value) or not value.isascii():
        raise PaymentValidationError(f"{field} may only contain letters and digits", field=field)
    return value


def validate_shortcode(value: str, *, field: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{5,6}", value):
        raise PaymentValidationError(f"{field} must be 5 or 6 digits", field=field)
    return value


def validate_provider_id(value: str, *, field: str) -> str:
    """An M-Pesa ID (or a third-party reference) sent back to M-Pesa: ``PROVIDER_ID``."""
    if not isinstance(value, str) or not PROVIDER_ID.fullmatch(value):
        raise PaymentValidationError(
            f"{field} must be 1-100 letters, digits, '_' or '-'", field=field
        )
    return value
