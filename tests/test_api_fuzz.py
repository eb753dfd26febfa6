"""Property tests of the HTTP API: whatever JSON (or query string) arrives, the answer is never an
unexpected 5xx, a 4xx always has the module's error shape, and a success never shows a full
phone number.

One app and one SQLite database per test function (not per example); the simulator is the
provider. The only 5xx allowed are the provider's own unavailability (``provider_unavailable``
503, ``outcome_unknown`` 504) for the simulator's scripted fault numbers.

Amounts of 26+ digits and bodies that are not UTF-8 have their own tests in ``test_router.py``.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import async_sessionmaker

from payments.database import create_engine_for
from payments.models import Base
from tests.support import PaymentApi, build_payment_api

EXAMPLES = 150
fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ERROR_KEYS = {"error_code", "message", "details"}
#: 5xx that are the provider's fault (the simulator's scripted faults), never the input's.
PROVIDER_5XX = {"provider_unavailable", "outcome_unknown"}

# The simulator's scripted numbers, except the slow one (it would only cost time).
SCRIPTED = [
    "258841234567",
    "258851234567",
    "258841000005",
    "258841000006",
    "258841002006",
    "258841000009",
    "258841000004",
    "258841000996",
    "258841000001",
    "258841000016",
    "258842000001",
    "258842000003",
    "258842000004",
    "258842000005",
]
SPELLINGS = ["+258 84 123 4567", "841234567", "00258841234567", "84-123-4567", "(84) 1234567"]

# --- strategies ---------------------------------------------------------------------------------

short_text = st.text(max_size=30)
long_text = st.text(min_size=45, max_size=300)
texts = st.one_of(short_text, short_text, long_text)

finite_or_not = st.one_of(
    st.floats(min_value=-1e24, max_value=1e24), st.sampled_from([math.nan, math.inf, -math.inf])
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**24), 10**24), finite_or_not, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(short_text, children, max_size=4)
    ),
    max_leaves=12,
)
amounts = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(-(10**24), 10**24),
    finite_or_not,
    st.decimals(min_value=-(10**24), max_value=10**24, places=2).map(str),
    st.decimals(min_value=-(10**24), max_value=10**24).map(str),
    st.sampled_from(
        ["NaN", "-NaN", "sNaN", "Infinity", "-inf", "1e2", "1E+5", "0.001", " 5 ", "", "1_000"]
    ),
    st.sampled_from(["100", "100.5", "150000", "150000.01", "0.99", "1", 1, 1.5, 99.99]),
    json_values,
)
phones = st.one_of(
    st.sampled_from(SCRIPTED + SPELLINGS),
    st.sampled_from(SCRIPTED).map(int),
    st.text(alphabet="+0123456789 -()", max_size=20),
    texts,
    json_values,
)
shortcodes = st.one_of(
    st.sampled_from(["979797", "171717", "12345", "1234", "1234567"]),
    st.text(alphabet=string.digits, max_size=8),
    texts,
    json_values,
)
keys = st.one_of(st.text(min_size=1, max_size=12), st.text(min_size=250, max_size=260))
metadata = st.one_of(st.dictionaries(short_text, json_values, max_size=5), json_values)
emails = st.one_of(st.emails().map(str), texts, json_values)


valid_amounts = st.one_of(
    st.integers(1, 150_000),
    st.decimals(min_value=1, max_value=150_000, places=2).map(str),
    st.sampled_from(["1", "1.00", 100.5, "150000", " 25 ", "1e2"]),
)
valid_texts = st.text(min_size=1, max_size=40).filter(str.strip)
valid_phones = st.sampled_from(SCRIPTED + SPELLINGS)


def body_of(
    valid: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]],
    wild: dict[str, st.SearchStrategy[Any]],
) -> st.SearchStrategy[Any]:
    """Plausible requests (so that many reach the provider), the same with one field (known or
    unknown) set to a wild value, objects of wild fields, and any JSON value at all."""
    plausible = st.fixed_dictionaries(valid, optional=optional)  # type: ignore[arg-type]
    names = st.one_of(st.sampled_from(sorted(wild)), short_text)
    mutated = st.builds(
        lambda body, name, data: body | {name: data.draw(wild.get(name, json_values))},
        plausible,
        names,
        st.data(),
    )
    anything = st.fixed_dictionaries({}, optional=wild)  # type: ignore[arg-type]
    return st.one_of(plausible, plausible, mutated, mutated, anything, json_values)


COMMON_VALID = {
    "account_reference": valid_texts,
    "description": valid_texts,
    "entity_type": valid_texts,
    "entity_id": valid_texts,
    "idempotency_key": st.text(min_size=1, max_size=20),
    "metadata": st.dictionaries(short_text, json_values, max_size=3),
}
COMMON_WILD = {
    "account_reference": texts | json_values,
    "description": texts | json_values,
    "entity_type": texts,
    "entity_id": texts,
    "idempotency_key": keys | json_values,
    "metadata": metadata,
}
initiate_bodies = body_of(
    {"phone_number": valid_phones, "amount": valid_amounts},
    COMMON_VALID | {"customer_name": valid_texts, "customer_email": st.emails().map(str)},
    COMMON_WILD
    | {"phone_number": phones, "amount": amounts, "customer_name": texts, "customer_email": emails},
)
payout_bodies = body_of(
    {"phone_number": valid_phones, "amount": valid_amounts},
    COMMON_VALID | {"customer_name": valid_texts},
    COMMON_WILD | {"phone_number": phones, "amount": amounts, "customer_name": texts},
)
transfer_bodies = body_of(
    {
        "receiver_party_code": st.sampled_from(["979797", "171717", "12345"]),
        "amount": valid_amounts,
    },
    COMMON_VALID,
    COMMON_WILD | {"receiver_party_code": shortcodes, "amount": amounts},
)
reversal_bodies = st.one_of(
    st.none(),
    body_of(
        {},
        {
            "amount": st.sampled_from(["0.01", 1, "5.55", 50, 100]),
            "reason": valid_texts,
            "idempotency_key": st.text(min_size=1, max_size=20),
        },
        {"amount": amounts, "reason": texts, "idempotency_key": keys},
    ),
)
idempotency_headers = st.one_of(
    st.none(), st.text(alphabet=string.printable.strip(), min_size=0, max_size=300)
)
path_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/.?#%\\"),
    min_size=1,
    max_size=40,
)

dates = st.one_of(
    st.dates().map(str), texts, st.sampled_from(["2025-13-01", "2025-02-30", "today", ""])
)
query_values = st.one_of(texts, st.integers().map(str), dates)


def query_of(fields: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[dict[str, str]]:
    known = st.fixed_dictionaries({}, optional=fields)  # type: ignore[arg-type]
    return st.builds(
        lambda params, extra: params | extra,
        known,
        st.dictionaries(st.text(min_size=1, max_size=8), query_values, max_size=2),
    )


list_queries = query_of(
    {
        "status": st.one_of(
            st.sampled_from(["completed", "cancelled", "failed", "unknown"]), texts
        ),
        "operation": st.one_of(st.sampled_from(["c2b", "b2c", "b2b", "reversal"]), texts),
        "phone_number": st.one_of(st.sampled_from(SCRIPTED + SPELLINGS), texts),
        "entity_type": texts,
        "entity_id": texts,
        "user_id": texts,
        "attention_required": st.one_of(st.sampled_from(["true", "false", "1", "no"]), texts),
        "from_date": dates,
        "to_date": dates,
        "page": st.one_of(st.integers(-5, 200_000).map(str), texts),
        "per_page": st.one_of(st.integers(-5, 200).map(str), texts),
    }
)
summary_queries = query_of({"from_date": dates, "to_date": dates})
customer_queries = query_of({"phone_number": st.one_of(st.sampled_from(SCRIPTED), phones.map(str))})


# --- the property -------------------------------------------------------------------------------


def check(response: httpx.Response, sent: Any) -> None:
    status = response.status_code
    event(f"HTTP {status}")
    request = response.request
    context = f"{request.method} {request.url} {sent!r} -> {status} {response.text[:500]}"
    assert "Traceback" not in response.text, context
    body = response.json()
    if status >= 500:
        assert isinstance(body, dict) and set(body) == ERROR_KEYS, context
        assert body["error_code"] in PROVIDER_5XX, context
    elif status >= 400:
        assert isinstance(body, dict) and set(body) == ERROR_KEYS, context
        assert isinstance(body["error_code"], str) and body["error_code"], context
        assert isinstance(body["message"], str) and body["message"], context
        assert isinstance(body["details"], dict), context
        payment = body["details"].get("payment")
        if payment is not None and payment.get("phone_number"):
            assert "*" in payment["phone_number"], context
    else:
        assert status in (200, 202), context
        assert isinstance(body, dict), context
        phone = body.get("phone_number")
        if isinstance(phone, str):
            assert phone.endswith("*****"), context


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity included, as Python's json allows


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[PaymentApi]:
    engine = create_engine_for(f"sqlite:///{tmp_path}/fuzz.db")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        async with build_payment_api(
            async_sessionmaker(engine, expire_on_commit=False),
            settings_overrides={"payment_c2b_timeout": 1},
        ) as harness:
            yield harness
    finally:
        await engine.dispose()


async def post(api: PaymentApi, path: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await api.http.post(path, content=encode(body), headers=headers)


# --- one property per endpoint ------------------------------------------------------------------


@fuzz_settings
@given(body=initiate_bodies, key=idempotency_headers)
async def test_initiate_never_5xx(api: PaymentApi, body: Any, key: str | None) -> None:
    check(await post(api, "/api/payments/initiate", body, key), (body, key))


@fuzz_settings
@given(body=payout_bodies, key=idempotency_headers)
async def test_payouts_never_5xx(api: PaymentApi, body: Any, key: str | None) -> None:
    check(await post(api, "/api/payments/payouts", body, key), (body, key))


@fuzz_settings
@given(body=transfer_bodies, key=idempotency_headers)
async def test_transfers_never_5xx(api: PaymentApi, body: Any, key: str | None) -> None:
    check(await post(api, "/api/payments/transfers", body, key), (body, key))


@fuzz_settings
@given(
    body=reversal_bodies,
    target=st.one_of(st.just("paid"), st.just("paid"), path_ids),
    key=idempotency_headers,
)
async def test_reverse_never_5xx(api: PaymentApi, body: Any, target: str, key: str | None) -> None:
    if target == "paid":
        paid = await post(
            api, "/api/payments/initiate", {"phone_number": SCRIPTED[0], "amount": 100}
        )
        assert paid.status_code == 200, paid.text
        target = paid.json()["transaction_id"]
    path = f"/api/payments/{quote(target, safe='')}/reverse"
    headers = {"Idempotency-Key": key} if key is not None else {}
    if body is None:
        response = await api.http.post(path, headers=headers)
    else:
        response = await api.http.post(
            path, content=encode(body), headers=headers | {"Content-Type": "application/json"}
        )
    check(response, (target, body, key))


@fuzz_settings
@given(params=list_queries)
async def test_list_never_5xx(api: PaymentApi, params: dict[str, str]) -> None:
    if await api.count() == 0:  # something to filter
        for phone in SCRIPTED[:3]:
            await post(api, "/api/payments/initiate", {"phone_number": phone, "amount": 10})
    response = await api.http.get("/api/payments/", params=params)
    check(response, params)
    if response.status_code == 200:
        listing = response.json()
        # The original shape, plus the cursor of the next page (issue 16).
        assert set(listing) == {"items", "total", "page", "per_page", "pages", "next_cursor"}
        assert len(listing["items"]) <= listing["per_page"]


@fuzz_settings
@given(params=summary_queries)
async def test_summary_never_5xx(api: PaymentApi, params: dict[str, str]) -> None:
    check(await api.http.get("/api/payments/summary", params=params), params)


@fuzz_settings
@given(params=customer_queries)
async def test_customer_name_never_5xx(api: PaymentApi, params: dict[str, str]) -> None:
    response = await api.http.get("/api/payments/customer-name", params=params)
    check(response, params)
    if response.status_code == 200:
        assert response.json()["phone_number"].endswith("*****")
