"""The payment logger: line format, daily files, JSON lines, and masking no call site can bypass."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from payments.config import get_settings
from payments.logger import configure_logging, payment_logger, shutdown_logging
from payments.mpesa.values import Msisdn
from payments.redaction import register_secret, sanitize, sanitize_text
from payments.simulator.keys import SIMULATOR_API_KEY
from tests.support import SUCCESS as FULL

MASKED = "2588412*****"
DAY = datetime(2025, 1, 15, 12, 34, 56)
LINE = re.compile(
    r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} - PAYMENT - (?P<level>[A-Z]+) - (?P<rest>.*)$"
)


@pytest.fixture(autouse=True)
def isolated_logging(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No settings from the real environment or a .env; the module's handlers removed afterwards."""
    for name in list(os.environ):
        if name.startswith(("MPESA_", "PAYMENT_")):
            monkeypatch.delenv(name)
    # Read right after the call: written on the caller's thread unless a test says otherwise.
    monkeypatch.setenv("PAYMENT_LOG_BACKGROUND", "false")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    shutdown_logging()
    get_settings.cache_clear()


def fixed_clock(moment: datetime = DAY) -> Callable[[], datetime]:
    return lambda: moment


def log_file(directory: Path, day: date | None = None) -> Path:
    return directory / f"payment_{(day or DAY.date()).isoformat()}.log"


def own_handlers() -> list[logging.Handler]:
    """The handlers this module installed (pytest adds its own to non-propagating loggers)."""
    return [h for h in payment_logger.logger.handlers if type(h).__module__ == "payments.logger"]


def written(directory: Path) -> str:
    return "".join(path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.log")))


def parsed(content: str) -> list[re.Match[str]]:
    """Each line of ``content`` matched against the text format (fails on any other line)."""
    matches = [LINE.match(line) for line in content.splitlines()]
    assert all(matches), content
    return [match for match in matches if match is not None]


def rests(content: str) -> list[str]:
    """What follows ``<timestamp> - PAYMENT - <LEVEL> - `` on each line."""
    return [match["rest"] for match in parsed(content)]


# --------------------------------------------------------------------------------------------------
# Line format, files, levels
# --------------------------------------------------------------------------------------------------


def test_text_line_format_in_a_daily_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    configure_logging(log_dir=str(directory), console=False, clock=fixed_clock())
    assert not directory.exists()  # created on demand, by the first record

    payment_logger.info(
        "Payment initiated",
        transaction_id="TXN-123",
        phone=Msisdn("841234567"),
        amount=Decimal("100.00"),
        note=None,
    )

    assert [path.name for path in directory.iterdir()] == ["payment_2025-01-15.log"]
    [match] = parsed(log_file(directory).read_text(encoding="utf-8"))
    assert match["level"] == "INFO"
    assert match["rest"] == (
        "Payment initiated | transaction_id=TXN-123 | phone=2588412***** | amount=100.00"
    )


def test_default_clock_names_the_file_after_today(tmp_path: Path) -> None:
    before = date.today()
    configure_logging(log_dir=str(tmp_path), console=False)
    payment_logger.info("hello")
    after = date.today()

    names = {path.name for path in tmp_path.glob("*.log")}
    assert names and names <= {f"payment_{before}.log", f"payment_{after}.log"}


def test_api_request_and_response_lines(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    url = "https://api.sandbox.vm.co.mz:18352/ipg/v1x/c2bPayment/singleStage/"

    payment_logger.api_request("post", url, operation="c2b", attempt=None)
    payment_logger.api_response(201, 1234.4, transaction_id="TXN-1")
    payment_logger.api_response("500", 0.6)

    assert rests(log_file(tmp_path).read_text()) == [
        f"API Request: POST {url} | operation=c2b",
        "API Response: 201 (1234ms) | transaction_id=TXN-1",
        "API Response: 500 (1ms)",
    ]


def test_levels_follow_the_configured_level(tmp_path: Path) -> None:
    info_dir, debug_dir = tmp_path / "info", tmp_path / "debug"
    configure_logging(log_dir=str(info_dir), console=False, level="INFO", clock=fixed_clock())
    payment_logger.debug("hidden")
    payment_logger.info("shown")

    configure_logging(log_dir=str(debug_dir), console=False, level="debug", clock=fixed_clock())
    for method in ("debug", "info", "warning", "error", "critical"):
        getattr(payment_logger, method)(f"{method} message")

    assert "hidden" not in written(info_dir)
    assert "shown" in written(info_dir)
    levels = [match["level"] for match in parsed(written(debug_dir))]
    assert levels == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def test_invalid_format_or_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_format"):
        configure_logging(log_dir=str(tmp_path), console=False, log_format="xml")
    with pytest.raises(ValueError, match="level"):
        configure_logging(log_dir=str(tmp_path), console=False, level="LOUD")


def test_rollover_when_the_date_changes(tmp_path: Path) -> None:
    now = [DAY.replace(hour=23, minute=59, second=59)]
    configure_logging(log_dir=str(tmp_path), console=False, clock=lambda: now[0])

    payment_logger.info("before midnight")
    now[0] += timedelta(seconds=2)
    payment_logger.info("after midnight")
    payment_logger.info("still the next day")

    first = log_file(tmp_path, DAY.date()).read_text()
    second = log_file(tmp_path, DAY.date() + timedelta(days=1)).read_text()
    assert rests(first) == ["before midnight"]
    assert rests(second) == ["after midnight", "still the next day"]


def test_configure_again_replaces_handlers_instead_of_duplicating(tmp_path: Path) -> None:
    for _ in range(3):
        configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    payment_logger.info("once")

    assert log_file(tmp_path).read_text().count("once") == 1
    assert len(own_handlers()) == 1
    assert payment_logger.logger.propagate is False

    configure_logging(log_dir=str(tmp_path), console=True, clock=fixed_clock())
    assert len(own_handlers()) == 2


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("configured", [True, False])
def test_records_do_not_propagate_to_the_root_logger(tmp_path: Path, configured: bool) -> None:
    if configured:
        configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    else:
        shutdown_logging()  # not yet configured: the first record configures it
    root = logging.getLogger()
    collect = Collect()
    root.addHandler(collect)
    try:
        payment_logger.warning("only in our file", phone=FULL)
        logging.getLogger(f"{payment_logger.logger.name}.client").warning("child %s", FULL)
    finally:
        root.removeHandler(collect)

    assert rests(written(tmp_path if configured else tmp_path / "logs")) == [
        f"only in our file | phone={MASKED}",
        f"child {MASKED}",
    ]
    assert collect.records == []


def test_console_uses_the_same_masked_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(log_dir=str(tmp_path), console=True, clock=fixed_clock())

    payment_logger.info("Payment initiated", phone=FULL)

    assert rests(capsys.readouterr().err) == [f"Payment initiated | phone={MASKED}"]


# --------------------------------------------------------------------------------------------------
# Lazy self-configuration
# --------------------------------------------------------------------------------------------------


def test_configures_itself_from_settings_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "from-settings"
    monkeypatch.setenv("MPESA_ENVIRONMENT", "simulator")
    monkeypatch.setenv("PAYMENT_LOG_DIR", str(directory))
    monkeypatch.setenv("PAYMENT_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PAYMENT_LOG_FORMAT", "json")
    shutdown_logging()

    payment_logger.debug(f"calling with key {SIMULATOR_API_KEY}", phone=FULL)

    files = list(directory.glob("payment_*.log"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["level"] == "DEBUG"
    assert record["message"] == "calling with key ***"  # the settings' API key is registered
    assert record["phone"] == MASKED
    console = capsys.readouterr().err
    assert json.loads(console)["message"] == "calling with key ***"
    assert SIMULATOR_API_KEY not in console and FULL not in console


def test_falls_back_to_defaults_when_settings_are_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_ENVIRONMENT", "production")  # no API key: settings raise
    shutdown_logging()

    payment_logger.debug("too detailed")
    payment_logger.info("Payment initiated", phone=FULL)

    content = written(tmp_path / "logs")  # the default directory, relative to the cwd
    assert "too detailed" not in content  # default level INFO
    assert rests(content) == [f"Payment initiated | phone={MASKED}"]


def test_direct_use_of_a_child_logger_is_configured_and_sanitised(tmp_path: Path) -> None:
    shutdown_logging()
    child = logging.getLogger(f"{payment_logger.logger.name}.client")

    child.warning("raw %s with Bearer abc.def", FULL)

    content = written(tmp_path / "logs")
    assert f"- PAYMENT - WARNING - raw {MASKED} with Bearer ***" in content
    assert FULL not in content and "abc.def" not in content


# --------------------------------------------------------------------------------------------------
# Masking in the written files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("258841234567", "2588412*****"),
        ("+258841234567", "2588412*****"),
        ("00258841234567", "2588412*****"),
        ("841234567", "2588412*****"),
        ("851234567", "2588512*****"),
        ("821234567", "2588212*****"),
        ("871234567", "2588712*****"),
    ],
)
def test_every_phone_form_is_masked_in_message_and_fields(
    tmp_path: Path, raw: str, masked: str
) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())

    payment_logger.info(f"customer {raw} paid", phone=raw, body={"input_CustomerMSISDN": raw})

    [rest] = rests(log_file(tmp_path).read_text())
    assert rest == (
        f'customer {masked} paid | phone={masked} | body={{"input_CustomerMSISDN": "{masked}"}}'
    )
    assert raw.lstrip("+0") not in rest
    assert raw[-9:] not in rest


def test_json_request_body_in_a_message_is_masked(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    body = json.dumps({"input_CustomerMSISDN": FULL, "input_Amount": "10.00"})

    payment_logger.debug("never shown")
    payment_logger.info(f"request body {body}")

    content = log_file(tmp_path).read_text()
    assert f'"input_CustomerMSISDN": "{MASKED}"' in content
    assert FULL not in content


def test_registered_and_configured_secrets_never_reach_the_file(tmp_path: Path) -> None:
    configure_logging(
        log_dir=str(tmp_path), console=False, clock=fixed_clock(), secrets=["sk-live-1a2b3c4d"]
    )
    register_secret("cred/with+chars=")

    payment_logger.info("key sk-live-1a2b3c4d in use", detail="credential cred/with+chars= sent")
    payment_logger.info("url-encoded cred%2Fwith%2Bchars%3D")

    content = log_file(tmp_path).read_text()
    assert "sk-live-1a2b3c4d" not in content
    assert "cred/with+chars=" not in content
    assert "cred%2Fwith%2Bchars%3D" not in content
    assert "key *** in use | detail=credential *** sent" in content


def test_settings_secrets_are_registered_by_explicit_configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPESA_ENVIRONMENT", "simulator")
    monkeypatch.setenv("MPESA_API_KEY", "custom-api-key-9f8e7d")
    monkeypatch.setenv("MPESA_SECURITY_CREDENTIAL", "custom-credential-77")

    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    payment_logger.info("using custom-api-key-9f8e7d and custom-credential-77")

    content = log_file(tmp_path).read_text()
    assert "custom-api-key-9f8e7d" not in content and "custom-credential-77" not in content
    assert "using *** and ***" in content


def test_short_secrets_are_ignored() -> None:
    register_secret("")
    register_secret("abc")

    assert sanitize_text("abc and abcd") == "abc and abcd"


def test_a_secret_containing_phone_like_digits_is_redacted_whole() -> None:
    register_secret("tok-841234567-end")

    assert sanitize_text("value tok-841234567-end here") == "value *** here"


def test_bearer_tokens_are_masked_even_in_tracebacks(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    token = "eyJhbGciOi.J9xQ/abc+def=="
    payment_logger.info(f"Authorization header Bearer {token} built")

    try:
        raise RuntimeError(f"provider refused bearer {token} for {FULL}")
    except RuntimeError:
        payment_logger.exception("Call failed", transaction_id="TXN-9")
    try:
        raise ValueError(f"api_key=k-{token}")
    except ValueError:
        payment_logger.error("Second failure", exc_info=True)

    content = log_file(tmp_path).read_text()
    assert "Authorization header Bearer *** built" in content
    assert "Call failed | transaction_id=TXN-9\nTraceback (most recent call last):" in content
    assert "RuntimeError: provider refused bearer *** for 2588412*****" in content
    assert "ValueError: api_key=***" in content
    assert "J9xQ" not in content and "eyJhbGciOi" not in content
    assert FULL not in content


def test_secret_looking_key_value_pairs_are_redacted(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())

    payment_logger.info(
        "headers",
        api_key="k-123456",
        headers={"X-Api-Key": "hdr-abcdef", "Content-Type": "application/json"},
        security_credential="c-98765",
    )
    payment_logger.info(
        "text password=hunter22 passwd: s3cr3t1 apikey=k-2 token=t0k3n "
        "x-callback-token: cb-xyz url=https://h/p?api_key=qwerty&page=2 transaction_id=TXN-1"
    )
    payment_logger.info(
        'body {"input_SecurityCredential": "Zm9vYmFy", "Secret": "shh-1", "input_Amount": "10"}'
    )
    payment_logger.info("repr {'Authorization': 'Basic dXNlcjpwYXNz'} done")

    content = log_file(tmp_path).read_text()
    for leaked in (
        "k-123456", "hdr-abcdef", "c-98765", "hunter22", "s3cr3t1", "k-2 ", "t0k3n", "cb-xyz",
        "qwerty", "Zm9vYmFy", "shh-1", "dXNlcjpwYXNz",
    ):  # fmt: skip
        assert leaked not in content
    assert (
        'headers | api_key=*** | headers={"X-Api-Key": "***", "Content-Type": "application/json"}'
        " | security_credential=***"
    ) in content
    assert (
        "text password=*** passwd: *** apikey=*** token=*** x-callback-token: *** "
        "url=https://h/p?api_key=***&page=2 transaction_id=TXN-1"
    ) in content
    assert '{"input_SecurityCredential": "***", "Secret": "***", "input_Amount": "10"}' in content
    assert "repr {'Authorization': '***'} done" in content


def test_records_are_sanitised_before_any_handler_sees_them(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    collect = Collect()
    payment_logger.logger.addHandler(collect)
    try:
        payment_logger.info(f"paid by {FULL}", api_key="k-123456", phone=FULL, body={"token": "t"})
    finally:
        payment_logger.logger.removeHandler(collect)

    [record] = collect.records
    assert record.getMessage() == (
        f'paid by {MASKED} | api_key=*** | phone={MASKED} | body={{"token": "***"}}'
    )
    assert record.payment_fields == {  # type: ignore[attr-defined]
        "api_key": "***",
        "phone": MASKED,
        "body": {"token": "***"},
    }
    assert record.funcName == "test_records_are_sanitised_before_any_handler_sees_them"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_composed_line_is_not_sanitised_a_second_time(
    tmp_path: Path, log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The payment logger masks the message and each field as it builds the record; the writer
    does not scan the finished line again (four lines per payment, each a few regex passes)."""
    from payments import log_formats

    configure_logging(
        log_dir=str(tmp_path), log_format=log_format, console=False, clock=fixed_clock()
    )
    scans: list[str] = []
    original = log_formats.sanitize_text
    monkeypatch.setattr(log_formats, "sanitize_text", lambda t: scans.append(t) or original(t))
    monkeypatch.setattr(log_formats, "sanitize", lambda v: scans.append(repr(v)) or sanitize(v))
    payment_logger.info(f"paid by {FULL}", phone=FULL, api_key="k-123456")
    shutdown_logging()
    content = written(tmp_path)
    assert FULL not in content and "k-123456" not in content and MASKED in content
    assert scans == []


def test_a_record_changed_after_it_was_composed_is_sanitised_again(tmp_path: Path) -> None:
    """A filter (the host's, say) that rewrites the message makes the line unknown again."""

    class Rewrite(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = f"rewritten with {FULL}"
            return True

    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock())
    rewrite = Rewrite()
    payment_logger.logger.addFilter(rewrite)
    try:
        payment_logger.info("paid")
    finally:
        payment_logger.logger.removeFilter(rewrite)
    shutdown_logging()
    assert rests(written(tmp_path)) == [f"rewritten with {MASKED}"]


# --------------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------------


def test_json_lines_format(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, log_format="json", clock=fixed_clock())

    payment_logger.info(
        "Payment initiated",
        transaction_id="TXN-1",
        phone=Msisdn("841234567"),
        amount=Decimal("100.00"),
        body={"input_CustomerMSISDN": FULL, "password": "p4ss"},
        message="a field called message",
        skipped=None,
    )
    payment_logger.api_response(201, 1234.4)
    try:
        raise RuntimeError(f"Bearer tok-abcdef for {FULL}")
    except RuntimeError:
        payment_logger.exception("failed")

    text = log_file(tmp_path).read_text()
    assert FULL not in text and "p4ss" not in text and "tok-abcdef" not in text
    first, second, third = (json.loads(line) for line in text.splitlines())
    assert datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    assert first == {
        "timestamp": first["timestamp"],
        "level": "INFO",
        "logger": payment_logger.logger.name,
        "message": "Payment initiated",
        "transaction_id": "TXN-1",
        "phone": MASKED,
        "amount": "100.00",
        "body": {"input_CustomerMSISDN": MASKED, "password": "***"},
        "field_message": "a field called message",
    }
    assert second["message"] == "API Response: 201 (1234ms)"
    assert (second["status"], second["duration_ms"]) == (201, 1234)
    assert third["level"] == "ERROR"
    assert third["exception"].startswith("Traceback (most recent call last):")
    assert third["exception"].endswith(f"RuntimeError: Bearer *** for {MASKED}")


# --------------------------------------------------------------------------------------------------
# sanitize / sanitize_text
# --------------------------------------------------------------------------------------------------


def test_sanitize_masks_nested_structures_without_mutating_its_input() -> None:
    data = {
        "input_CustomerMSISDN": FULL,
        "input_SecurityCredential": "c-123456",
        "nested": [
            {"token": "t-1", "phone": Msisdn("851234567"), "note": f"call +{FULL}"},
            ("00258871234567", 3, 1.5, True),
        ],
        "Authorization": None,
        "amount": Decimal("10.00"),
        "at": datetime(2025, 1, 15, 12, 0),
        "msisdn_as_int": 258841234567,
        "count": 7,
    }
    original = copy.deepcopy(data)

    result = sanitize(data)

    assert data == original
    assert result == {
        "input_CustomerMSISDN": MASKED,
        "input_SecurityCredential": "***",
        "nested": [
            {"token": "***", "phone": "2588512*****", "note": f"call {MASKED}"},
            ("2588712*****", 3, 1.5, True),
        ],
        "Authorization": None,
        "amount": "10.00",
        "at": "2025-01-15T12:00:00",
        "msisdn_as_int": MASKED,
        "count": 7,
    }
    assert result is not data
    assert result["nested"] is not data["nested"]
    assert isinstance(result["nested"][1], tuple)
    json.dumps(result)  # safe to store as JSON


def test_sanitize_text_leaves_other_numbers_alone() -> None:
    text = (
        "ref 1258841234567 long 8412345678 short 84123456 other 881234567 "
        "amount 100.00 at 2025-01-15 12:34:56 already 2588412*****"
    )

    assert sanitize_text(text) == text
    assert sanitize_text(sanitize_text(f"x {FULL}")) == f"x {MASKED}"


def test_digits_inside_an_id_are_not_a_phone_number() -> None:
    """M-Pesa's IDs are evidence: a hex ConversationID whose digits happen to read like a phone
    number (``879820204``) is kept whole, in text and in an audit body; a number beside
    punctuation is still masked."""
    conversation_id = "76a90673d6d6e428baf879820204bb4f"
    assert sanitize_text(conversation_id) == conversation_id
    assert sanitize({"input_QueryReference": conversation_id}) == {
        "input_QueryReference": conversation_id
    }
    assert sanitize_text(f"AG_20180206_{FULL}") == f"AG_20180206_{FULL}"  # one word with digits
    assert sanitize_text(f"({FULL}), tel:{FULL}; {FULL}.") == (
        f"({MASKED}), tel:{MASKED}; {MASKED}."
    )


def test_sanitize_text_is_linear_on_hostile_input() -> None:
    # ~20k characters each: a few milliseconds when linear, many seconds if a regex backtracks.
    hostile = [
        "token" * 4_000,
        "api_key" * 3_000 + "-",
        "8" * 20_000,
        "a" * 10_000 + "=" + "b" * 10_000,
        'token: "' + "x" * 20_000,
        "Bearer " * 3_000,
        "key=" * 5_000,
        "841234567 " * 2_000,
    ]
    started = time.perf_counter()
    for text in hostile:
        sanitize_text(text)
    assert time.perf_counter() - started < 1.0


def test_background_writing_keeps_every_line_and_its_masking(tmp_path: Path) -> None:
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock(), background=True)
    for index in range(200):
        payment_logger.info("Payment initiated", phone=FULL, index=index)
    shutdown_logging()  # drains the writer thread
    lines = written(tmp_path).splitlines()
    assert len(lines) == 200
    assert lines[-1].endswith(f"Payment initiated | phone={MASKED} | index=199")
    assert FULL not in written(tmp_path)


def test_lines_are_written_off_the_caller_thread_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path is the default for a host: no setting needed."""
    monkeypatch.delenv("PAYMENT_LOG_BACKGROUND")
    monkeypatch.setenv("MPESA_ENVIRONMENT", "simulator")
    get_settings.cache_clear()
    assert get_settings().payment_log_background is True
    payment_logger.info("first line configures logging")
    [writer] = own_handlers()
    assert type(writer).__name__ == "_BackgroundHandler"


def paused_clock(release_after: float) -> tuple[Callable[[], datetime], list[int]]:
    """A clock the file handler calls in the writer thread: the first call blocks until
    ``release_after`` seconds have passed, so lines queue up behind it."""
    released = threading.Event()
    threading.Timer(release_after, released.set).start()
    calls: list[int] = []

    def clock() -> datetime:
        calls.append(1)
        released.wait(timeout=10)
        return DAY

    return clock, calls


def test_an_error_line_is_written_before_the_call_returns(tmp_path: Path) -> None:
    """INFO lines may wait in the writer's queue; an ERROR or CRITICAL line (e.g. "Payment
    outcome NOT recorded", the last place M-Pesa's answer survives) is on disk, after every line
    queued before it, when the call returns."""
    clock, _ = paused_clock(0.3)
    configure_logging(log_dir=str(tmp_path), console=False, clock=clock, background=True)
    for index in range(50):
        payment_logger.info("queued", index=index)
    payment_logger.critical("Payment outcome NOT recorded", mpesa_receipt="ABC123", phone=FULL)
    lines = written(tmp_path).splitlines()
    assert len(lines) == 51
    assert lines[-1].endswith(
        f"Payment outcome NOT recorded | mpesa_receipt=ABC123 | phone={MASKED}"
    )
    shutdown_logging()


def test_the_writer_thread_writes_what_queued_up_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write and one flush per batch, not per line: a burst of payments costs a few system
    calls. Every line once, in order."""
    writes: list[str] = []

    class CountingStream:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", CountingStream())
    clock, _ = paused_clock(0.3)
    configure_logging(log_dir=str(tmp_path), console=True, clock=clock, background=True)
    for index in range(1000):
        payment_logger.info("Payment initiated", phone=FULL, index=index)
    shutdown_logging()
    lines = written(tmp_path).splitlines()
    assert [line.rsplit("index=", 1)[1] for line in lines] == [str(i) for i in range(1000)]
    assert "".join(writes).splitlines() == lines
    assert len(writes) <= 10  # 1,000 lines: the first alone, then batches of up to 256
    assert FULL not in written(tmp_path)


def test_a_forked_child_writes_its_lines_with_a_writer_of_its_own(tmp_path: Path) -> None:
    """Threads do not survive a fork (gunicorn --preload forks after the app logged): the child
    starts its own writer instead of queueing lines nobody writes."""
    configure_logging(log_dir=str(tmp_path), console=False, clock=fixed_clock(), background=True)
    payment_logger.info("parent before the fork")
    pid = os.fork()
    if pid == 0:  # the child
        try:
            payment_logger.info("child after the fork", phone=FULL)
            shutdown_logging()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    shutdown_logging()
    text = written(tmp_path)
    assert "parent before the fork" in text
    assert f"child after the fork | phone={MASKED}" in text


def test_a_text_found_clean_is_masked_once_a_secret_in_it_is_registered() -> None:
    """``sanitize_text`` remembers texts with nothing to mask (the same messages and URLs come
    by on every payment); registering a secret forgets them."""
    text = "callback from partner-7f3a9c2e1b at 10:00"
    assert sanitize_text(text) == text
    assert sanitize_text(text) == text  # remembered
    register_secret("partner-7f3a9c2e1b")
    assert sanitize_text(text) == "callback from *** at 10:00"


def test_texts_with_something_masked_are_not_remembered() -> None:
    """Only clean texts are kept in memory: never a phone number or a secret."""
    from payments import redaction

    for _ in range(2):
        assert redaction.sanitize_text("paid by 258841234567 at 10:00") == (
            f"paid by {Msisdn('258841234567').masked} at 10:00"
        )
        assert redaction.sanitize_text("Authorization: Bearer abc.def.ghi") == "Authorization: ***"
    remembered = " ".join(redaction._secrets.clean_texts)
    assert "841234567" not in remembered and "abc.def" not in remembered
