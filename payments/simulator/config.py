"""The simulator's settings, and the checks ``PUT /simulator/config`` applies to changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .keys import (
    SIMULATOR_API_KEY,
    SIMULATOR_INITIATOR_IDENTIFIER,
    SIMULATOR_PRIVATE_KEY_PEM,
    SIMULATOR_SECURITY_CREDENTIAL,
    SIMULATOR_SERVICE_PROVIDER_CODE,
)

__all__ = ["SETTABLE", "SimulatorConfig", "apply_settings", "public_settings"]


@dataclass
class SimulatorConfig:
    api_key: str = SIMULATOR_API_KEY
    private_key_pem: str = SIMULATOR_PRIVATE_KEY_PEM
    service_provider_code: str = SIMULATOR_SERVICE_PROVIDER_CODE
    initiator_identifier: str = SIMULATOR_INITIATOR_IDENTIFIER
    security_credential: str = SIMULATOR_SECURITY_CREDENTIAL
    pin_delay_seconds: float = 0.0  # how long C2B waits for the "customer's PIN"
    slow_response_seconds: float = 300.0  # delay of the scripted slow number
    check_origin: bool = False
    # Switches for behaviour the wire reference leaves open (§8); the defaults are the guesses
    # the module must not depend on. Each has a test of the module's behaviour under it.
    #: False: a third-party reference is no query reference (§8 Q2): such a query is not found.
    query_by_third_party_reference: bool = True
    #: INS-10 also needs the same ``input_TransactionReference`` (§8 Q4: which fields?).
    duplicates_match_transaction_reference: bool = False
    #: INS-10 only within this many seconds of the earlier request (§8 Q4: window?); None: forever.
    duplicate_window_seconds: float | None = None
    #: Not found answers INS-23 (400) instead of INS-0 with status N/A.
    not_found_as_ins_23: bool = False
    #: A status answer carries its own ConversationID, not the original's (§2.2 vs §2.6 examples).
    status_answer_own_conversation_id: bool = False
    #: Every API call is refused with ``{"output_error": <this text>}`` (HTTP 401), no code.
    refusal_output_error: str | None = None
    #: Every answer carries a header with non-ASCII bytes (§1: strict parsers reject them).
    non_ascii_header: bool = False
    #: The gateway's own C2B timeout (the real one: about 66 s, §5.1): a customer slower than
    #: this gets INS-9 at this time, and the payment is recorded Expired. None: no timeout.
    c2b_server_timeout_seconds: float | None = None
    #: queryCustomerName answers INS-26 "Not authorized", as the real sandbox does (§2.7).
    customer_name_not_authorized: bool = False
    #: ConversationIDs shaped like the portal's example ``AG_20180206_00005e7dccc6da08efa8``.
    portal_conversation_ids: bool = False


#: What ``PUT /simulator/config`` may change, and its kind (``?``: may be null).
SETTABLE: dict[str, str] = {
    "pin_delay_seconds": "seconds",
    "slow_response_seconds": "seconds",
    "check_origin": "flag",
    "query_by_third_party_reference": "flag",
    "duplicates_match_transaction_reference": "flag",
    "duplicate_window_seconds": "seconds?",
    "not_found_as_ins_23": "flag",
    "status_answer_own_conversation_id": "flag",
    "refusal_output_error": "text?",
    "non_ascii_header": "flag",
    "c2b_server_timeout_seconds": "seconds?",
    "customer_name_not_authorized": "flag",
    "portal_conversation_ids": "flag",
}


def public_settings(config: SimulatorConfig) -> dict[str, object]:
    """What ``PUT /simulator/config`` answers: the settable values and the shortcode."""
    settable = {name: getattr(config, name) for name in SETTABLE}
    return settable | {"service_provider_code": config.service_provider_code}


def apply_settings(config: SimulatorConfig, payload: Mapping[str, object]) -> str | None:
    """Apply the changes in ``payload`` to ``config``, all or none; the problem if none."""
    unknown = set(payload) - set(SETTABLE)
    if unknown:
        return f"unknown settings: {sorted(unknown)}"
    changes: dict[str, Any] = {}
    for name, value in payload.items():
        kind = SETTABLE[name]
        if value is None and kind.endswith("?"):
            changes[name] = None
        elif kind.startswith("seconds"):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value < float("inf")
            ):
                return f"{name} must be a non-negative number"
            changes[name] = float(value)
        elif kind == "flag":
            if not isinstance(value, bool):
                return f"{name} must be a boolean"
            changes[name] = value
        else:  # text?
            if not isinstance(value, str) or not value:
                return f"{name} must be a non-empty string or null"
            changes[name] = value
    for name, value in changes.items():
        setattr(config, name, value)
    return None
