import re
from pathlib import Path

import pytest

from payments.mpesa.codes import PORTAL_CODES, Disposition, ResponseCodeTable

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/reference/vodacom-mz-api.md"


def _portal_rows() -> list[tuple[str, str, str]]:
    """(HTTP, code, description) rows of the reference's §3.1 table."""
    text = REFERENCE.read_text()
    section = text.split("### 3.1", 1)[1].split("###", 1)[0]
    return re.findall(r"^\| ([\d /]+) \| (INS-\d+) \| (.+?) \|$", section, flags=re.M)


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference not beside the checkout")
def test_table_covers_every_portal_code_with_its_status_and_description() -> None:
    rows = _portal_rows()
    assert len(rows) == 33
    table = ResponseCodeTable.default()
    for http, code, description in rows:
        entry = table.lookup(code)
        assert entry.code == code
        assert entry.description == description
        assert str(entry.http_status) == http.split(" ")[0]


def test_table_has_every_code_once() -> None:
    codes = [entry.code for entry in PORTAL_CODES]
    assert len(codes) == len(set(codes)) == 33


@pytest.mark.parametrize(
    ("code", "disposition", "known"),
    [
        ("INS-0", Disposition.SUCCESS, True),
        ("INS-1", Disposition.AMBIGUOUS, False),
        ("INS-2", Disposition.INVALID_REQUEST, True),
        ("INS-4", Disposition.CUSTOMER_DECLINED, True),
        ("INS-5", Disposition.CUSTOMER_DECLINED, True),
        ("INS-6", Disposition.CUSTOMER_DECLINED, True),
        ("INS-9", Disposition.AMBIGUOUS, False),
        ("INS-10", Disposition.DUPLICATE, False),
        ("INS-13", Disposition.INVALID_REQUEST, True),
        ("INS-16", Disposition.OVERLOADED, False),
        ("INS-20", Disposition.INVALID_REQUEST, True),
        ("INS-23", Disposition.AMBIGUOUS, False),
        ("INS-26", Disposition.INVALID_REQUEST, True),
        ("INS-996", Disposition.CUSTOMER_DECLINED, True),
        ("INS-2006", Disposition.INSUFFICIENT_FUNDS, True),
        ("INS-2051", Disposition.INVALID_REQUEST, True),
    ],
)
def test_dispositions(code: str, disposition: Disposition, known: bool) -> None:
    entry = ResponseCodeTable.default().lookup(code)
    assert entry.disposition is disposition
    assert entry.outcome_known is known
    assert entry.action


@pytest.mark.parametrize("code", ["", None, "INS-999", "INS-27", "garbage"])
def test_unknown_and_empty_codes_are_ambiguous(code: str | None) -> None:
    entry = ResponseCodeTable.default().lookup(code, 400)
    assert entry.disposition is Disposition.AMBIGUOUS
    assert not entry.outcome_known


def test_overrides_replace_or_add_entries() -> None:
    table = ResponseCodeTable.from_json_overrides(
        '{"INS-9": "customer_declined",'
        ' "INS-2005": {"disposition": "invalid_request", "description": "Rule limited."}}'
    )
    assert table.lookup("INS-9").disposition is Disposition.CUSTOMER_DECLINED
    assert table.lookup("INS-9").description == "Request timeout"
    assert table.lookup("INS-2005").description == "Rule limited."
    assert table.lookup("INS-2005").disposition is Disposition.INVALID_REQUEST
    assert ResponseCodeTable.default().lookup("INS-9").disposition is Disposition.AMBIGUOUS


@pytest.mark.parametrize(
    "raw", ['{"INS-9": "maybe"}', '["INS-9"]', '{"INS-9": {"colour": "red"}}', '{"INS-9": 5}']
)
def test_bad_overrides_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError):
        ResponseCodeTable.from_json_overrides(raw)
