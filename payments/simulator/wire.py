"""M-Pesa's wire format as the simulator reads and writes it: ``input_*`` fields, ``output_*``
answers, and the response code a malformed field earns."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from fastapi import Request
from fastapi.responses import JSONResponse

from ..mpesa.codes import ResponseCodeTable

__all__ = [
    "MSISDN",
    "PARTY_CODE",
    "REFERENCE",
    "ProviderError",
    "answer_body",
    "check",
    "money_answer",
    "parse_amount",
    "read_json_object",
    "require",
    "text",
]

MSISDN = re.compile(r"2588[45]\d{7}")
REFERENCE = re.compile(r"[A-Za-z0-9]{1,20}")
PARTY_CODE = re.compile(r"\d{5,6}")
_AMOUNT_TEXT = re.compile(r"\d+(\.\d{1,2})?")
_CENT = Decimal("0.01")

CODES = ResponseCodeTable.default()


class ProviderError(Exception):
    """A request the provider refuses with this response code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def parse_amount(value: object) -> Decimal:
    """A positive amount with at most two decimals, as a JSON string or number; else INS-15."""
    if isinstance(value, bool):
        raise ProviderError("INS-15")
    try:
        if isinstance(value, str):
            if not _AMOUNT_TEXT.fullmatch(value):
                raise ProviderError("INS-15")
            amount = Decimal(value)
        elif isinstance(value, int):
            amount = Decimal(value)
        elif isinstance(value, float):
            amount = Decimal(repr(value))
        else:
            raise ProviderError("INS-15")
    except InvalidOperation:
        raise ProviderError("INS-15") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(_CENT):
        raise ProviderError("INS-15")
    return amount.quantize(_CENT)


def text(value: object) -> str:
    """A field value as text: strings as they are, integers tolerated; anything else INS-21."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ProviderError("INS-21")


def require(payload: Mapping[str, object], *names: str) -> None:
    """INS-20 unless every field is there: absent, ``null`` and empty count as missing."""
    for name in names:
        value = payload.get(name)
        if value is None or value == "":
            raise ProviderError("INS-20")


def check(pattern: re.Pattern[str], value: str, code: str) -> str:
    if not pattern.fullmatch(value):
        raise ProviderError(code)
    return value


async def read_json_object(request: Request) -> dict[str, object] | None:
    """The request's JSON object; None if the body is not one."""
    raw = await request.body()
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def answer_body(code: str, **outputs: str) -> tuple[dict[str, str], int]:
    """An answer's body (code, description, then ``output_<name>`` for each output) and the
    HTTP status the portal gives the code."""
    entry = CODES.lookup(code)
    body = {"output_ResponseCode": entry.code, "output_ResponseDesc": entry.description}
    body.update({f"output_{name}": value for name, value in outputs.items()})
    return body, entry.http_status


def money_answer(
    code: str,
    *,
    conversation_id: str,
    reference: str,
    transaction_id: str = "",
    success_status: int = 200,
) -> JSONResponse:
    """The answer of a money-moving call; INS-0 gets ``success_status``."""
    body, status = answer_body(
        code,
        TransactionID=transaction_id,
        ConversationID=conversation_id,
        ThirdPartyReference=reference,
    )
    return JSONResponse(body, status_code=success_status if code == "INS-0" else status)
