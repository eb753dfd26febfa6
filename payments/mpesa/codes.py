"""M-Pesa Mozambique response codes: what each one means and what to do about it.

The table follows the portal's code list (HTTP status, code, description). Each code also carries a
*disposition*, the one fact the rest of the module decides on, and a friendly action for people.
Codes are reported wrong in the field, so a deployment can override entries from configuration
(``MPESA_RESPONSE_CODE_OVERRIDES``) without a code change.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum


class Disposition(StrEnum):
    """What a provider answer means for the payment it is about."""

    SUCCESS = "success"
    CUSTOMER_DECLINED = "customer_declined"  # cancelled, failed PIN, inactive: no money moved
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INVALID_REQUEST = "invalid_request"  # our input or configuration is wrong: fix, do not retry
    DUPLICATE = "duplicate"  # the third-party reference was already used: ask for the status
    OVERLOADED = "overloaded"  # temporary; safe to retry a query, ambiguous for money-moving calls
    AMBIGUOUS = "ambiguous"  # the outcome is unknown: only a status query can settle it


@dataclass(frozen=True, slots=True)
class ResponseCode:
    code: str
    http_status: int
    description: str
    action: str
    disposition: Disposition

    @property
    def outcome_known(self) -> bool:
        """Whether this answer settles a money-moving request (no status query needed)."""
        return self.disposition not in (
            Disposition.DUPLICATE,
            Disposition.OVERLOADED,
            Disposition.AMBIGUOUS,
        )


_D = Disposition

#: Every code of the portal's table (vodacom-mz-api.md §3.1), in its order:
#: (code, HTTP status, description, action, disposition).
# fmt: off
_PORTAL_ROWS: tuple[tuple[str, int, str, str, Disposition], ...] = (
    ("INS-0", 200, "Request processed successfully",
     "None: success", _D.SUCCESS),
    ("INS-1", 500, "Internal Error",
     "Query the status before retrying", _D.AMBIGUOUS),
    ("INS-2", 401, "Invalid API Key",
     "Check MPESA_API_KEY and MPESA_PUBLIC_KEY", _D.INVALID_REQUEST),
    ("INS-4", 401, "User is not active",
     "Customer must activate the M-Pesa account", _D.CUSTOMER_DECLINED),
    ("INS-5", 401, "Transaction cancelled by customer",
     "Customer declined; ask again", _D.CUSTOMER_DECLINED),
    ("INS-6", 401, "Transaction Failed",
     "Customer may retry (e.g. wrong PIN)", _D.CUSTOMER_DECLINED),
    ("INS-9", 408, "Request timeout",
     "Query the status; the PIN may still be entered", _D.AMBIGUOUS),
    ("INS-10", 409, "Duplicate Transaction",
     "Query the status of the original request", _D.DUPLICATE),
    ("INS-13", 400, "Invalid Shortcode Used",
     "Check MPESA_SERVICE_PROVIDER_CODE", _D.INVALID_REQUEST),
    ("INS-14", 400, "Invalid Reference Used",
     "Check the reference", _D.INVALID_REQUEST),
    ("INS-15", 400, "Invalid Amount Used",
     "Check the amount", _D.INVALID_REQUEST),
    ("INS-16", 503, "Unable to handle the request due to a temporary overloading",
     "Query the status, retry later", _D.OVERLOADED),
    ("INS-17", 400, "Invalid Transaction Reference. Length Should Be Between 1 and 20.",
     "Use 1-20 letters and digits", _D.INVALID_REQUEST),
    ("INS-18", 400, "Invalid TransactionID Used",
     "Check the M-Pesa transaction ID", _D.INVALID_REQUEST),
    ("INS-19", 400, "Invalid ThirdPartyReference Used",
     "Check the third-party reference", _D.INVALID_REQUEST),
    ("INS-20", 400, "Not All Parameters Provided. Please try again.",
     "A required field is missing", _D.INVALID_REQUEST),
    ("INS-21", 400, "Parameter validations failed. Please try again.",
     "Check the request fields", _D.INVALID_REQUEST),
    ("INS-22", 400, "Invalid Operation Type",
     "Check the operation", _D.INVALID_REQUEST),
    ("INS-23", 400, "Unknown Status. Contact M-Pesa Support",
     "Query the status; contact M-Pesa support", _D.AMBIGUOUS),
    ("INS-24", 400, "Invalid InitiatorIdentifier Used",
     "Check MPESA_INITIATOR_IDENTIFIER", _D.INVALID_REQUEST),
    ("INS-25", 400, "Invalid SecurityCredential Used",
     "Check MPESA_SECURITY_CREDENTIAL", _D.INVALID_REQUEST),
    ("INS-26", 400, "Not authorized",
     "The API key lacks this permission", _D.INVALID_REQUEST),
    ("INS-993", 400, "Direct Debit Missing",
     "No direct debit mandate", _D.INVALID_REQUEST),
    ("INS-994", 400, "Direct Debit Already Exists",
     "Mandate already exists", _D.INVALID_REQUEST),
    ("INS-995", 400, "Customer's Profile Has Problems",
     "Customer must contact M-Pesa", _D.CUSTOMER_DECLINED),
    ("INS-996", 400, "Customer Account Status Not Active",
     "Customer must activate the M-Pesa account", _D.CUSTOMER_DECLINED),
    ("INS-997", 400, "Linking Transaction Not Found",
     "Check the linked transaction", _D.INVALID_REQUEST),
    ("INS-998", 400, "Invalid Market",
     "Check the environment and market", _D.INVALID_REQUEST),
    ("INS-2001", 400, "Initiator authentication error.",
     "Check the initiator identifier and security credential", _D.INVALID_REQUEST),
    ("INS-2002", 400, "Receiver invalid.",
     "Check the receiving party", _D.INVALID_REQUEST),
    ("INS-2006", 422, "Insufficient balance",
     "Customer must top up the wallet", _D.INSUFFICIENT_FUNDS),
    ("INS-2051", 400, "MSISDN invalid.",
     "Check the phone number", _D.INVALID_REQUEST),
    ("INS-2057", 400, "Language code invalid.",
     "Check the language code", _D.INVALID_REQUEST),
)
# fmt: on

PORTAL_CODES: tuple[ResponseCode, ...] = tuple(ResponseCode(*row) for row in _PORTAL_ROWS)

# The codes the module decides on by name (everything else goes by disposition).
#: Success: ``INS-0``, and plain ``0`` as result notifications send it.
SUCCESS_CODES = frozenset({"INS-0", "0"})
#: The customer cancelled: the payment ends ``cancelled`` (other refusals end ``failed``).
CANCELLED_BY_CUSTOMER = "INS-5"
#: The wallet's balance is too low.
INSUFFICIENT_BALANCE = "INS-2006"
#: The customer's side refused (inactive, wrong PIN, profile problems), besides cancelling.
CUSTOMER_REFUSALS = frozenset(
    entry.code
    for entry in PORTAL_CODES
    if entry.disposition is Disposition.CUSTOMER_DECLINED and entry.code != CANCELLED_BY_CUSTOMER
)
#: Status-query refusals of the key itself ("Invalid Reference/TransactionID Used", "Parameter
#: validations failed"): the gateway would not look that key up, so the next one is tried.
KEY_REFUSED_CODES = frozenset({"INS-14", "INS-18", "INS-21"})
#: A status answer meaning "M-Pesa cannot find what was asked for": INS-23 ("Unknown Status",
#: the OpenAPI's "Transaction not found").
NOT_FOUND_CODES = frozenset({"INS-23"})
#: Refusals of the deployment's credentials or permissions (not of one request's fields).
AUTH_CODES = frozenset({"INS-2", "INS-13", "INS-26"})


def _row(code: str) -> str:
    """``code``, checked against the table when the module loads: a reply never sends a code
    the table does not have."""
    if not any(entry.code == code for entry in PORTAL_CODES):
        raise ValueError(f"{code} is not in the response code table")
    return code


# Our replies to M-Pesa's result notifications (``notifications.provider_answer``).
#: Accepted: ``0``, as the notifications themselves spell success (one of ``SUCCESS_CODES``).
REPLY_ACCEPTED = "0"
#: "Internal Error": we could not take it now (store or process); M-Pesa delivers it again.
REPLY_INTERNAL_ERROR = _row("INS-1")
#: "Invalid API Key": the notification's credentials were refused.
REPLY_UNAUTHORIZED = _row("INS-2")
#: "Parameter validations failed": the body is too large or not a JSON object.
REPLY_INVALID_BODY = _row("INS-21")


def unknown_code(code: str, http_status: int) -> ResponseCode:
    """The entry for a code missing from the table: never trusted as an outcome."""
    return ResponseCode(
        code=code,
        http_status=http_status,
        description="Unknown response code" if code else "No response code",
        action="Query the status; the outcome is unknown",
        disposition=Disposition.AMBIGUOUS,
    )


class ResponseCodeTable:
    """Looks up codes; built from the portal table plus configured overrides."""

    def __init__(self, entries: Mapping[str, ResponseCode]) -> None:
        self._entries = dict(entries)

    @classmethod
    def default(cls) -> ResponseCodeTable:
        return cls({entry.code: entry for entry in PORTAL_CODES})

    def with_overrides(self, overrides: Mapping[str, object]) -> ResponseCodeTable:
        """Return a table where each override replaces or adds one entry.

        An override is either a disposition name (``{"INS-9": "customer_declined"}``) or an object
        with any of ``disposition``, ``description``, ``action`` and ``http_status``.
        """
        entries = dict(self._entries)
        for code, override in overrides.items():
            base = entries.get(code) or unknown_code(code, 400)
            if isinstance(override, str):
                override = {"disposition": override}
            if not isinstance(override, Mapping):
                raise ValueError(f"override for {code} must be a disposition name or an object")
            unknown_keys = set(override) - {"disposition", "description", "action", "http_status"}
            if unknown_keys:
                raise ValueError(f"override for {code} has unknown keys: {sorted(unknown_keys)}")
            changes: dict[str, object] = {}
            if "disposition" in override:
                try:
                    changes["disposition"] = Disposition(str(override["disposition"]))
                except ValueError:
                    allowed = ", ".join(d.value for d in Disposition)
                    raise ValueError(
                        f"override for {code}: unknown disposition {override['disposition']!r}"
                        f" (allowed: {allowed})"
                    ) from None
            for key in ("description", "action"):
                if key in override:
                    changes[key] = str(override[key])
            if "http_status" in override:
                changes["http_status"] = int(str(override["http_status"]))
            entries[code] = replace(base, **changes)  # type: ignore[arg-type]
        return ResponseCodeTable(entries)

    @classmethod
    def from_json_overrides(cls, raw: str | None) -> ResponseCodeTable:
        table = cls.default()
        if not raw or not raw.strip():
            return table
        parsed = json.loads(raw)
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object mapping codes to overrides")
        return table.with_overrides(parsed)

    def lookup(self, code: str | None, http_status: int = 0) -> ResponseCode:
        normalized = (code or "").strip()
        return self._entries.get(normalized) or unknown_code(normalized, http_status)

    def __iter__(self) -> Iterator[ResponseCode]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
