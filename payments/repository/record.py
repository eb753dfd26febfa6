"""``PaymentRecord``: a payment's values at one moment, and what else derives from the one
definition of a payment's columns, the table of ``models.PaymentTransaction``.

The record spells its fields out (so they are typed); importing this module checks them against
the table, so a column added to the model without its field (or with another type) fails at
import, not in a payment. The defaults a new payment's row takes come from the model too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from functools import partial
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

from sqlalchemy import inspect

from ..models import PaymentTransaction, as_utc


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """A payment's values at one moment. What hooks receive and responses are built from."""

    id: int
    transaction_id: str
    operation: str
    status: str
    amount: Decimal
    reversed_amount: Decimal
    currency: str
    phone_number: str | None
    receiver_party_code: str | None
    conversation_id: str | None
    provider_transaction_id: str | None
    third_party_reference: str
    transaction_reference: str | None
    account_reference: str | None
    description: str | None
    entity_type: str | None
    entity_id: str | None
    customer_name: str | None
    customer_email: str | None
    user_id: str | None
    idempotency_key: str | None
    request_fingerprint: str | None
    response_code: str | None
    response_description: str | None
    status_description: str | None
    error_code: str | None
    original_id: int | None
    metadata: dict[str, Any] | None
    attention_required: bool
    operator_hold: bool
    reconcile_attempts: int
    version: int
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    #: Not a column: the ``transaction_id`` of the payment ``original_id`` names.
    original_transaction_id: str | None = None

    @classmethod
    def of(
        cls, row: PaymentTransaction, original_transaction_id: str | None = None
    ) -> PaymentRecord:
        """From an ORM row."""
        return cls.from_columns(
            {name: getattr(row, attribute) for name, attribute in _ATTRIBUTES},
            original_transaction_id,
        )

    def columns(self) -> dict[str, Any]:
        """This record as column values (what ``from_columns`` takes)."""
        return {name: getattr(self, name) for name in RECORD_COLUMNS}

    @classmethod
    def from_columns(
        cls, columns: Mapping[str, Any], original_transaction_id: str | None = None
    ) -> PaymentRecord:
        """From column values (a Core row's mapping, or the values just written)."""
        values = {name: columns[name] for name in RECORD_COLUMNS}
        for key in _TIMESTAMPS:
            values[key] = as_utc(values[key])
        return cls(**values, original_transaction_id=original_transaction_id)


PAYMENTS_TABLE = PaymentTransaction.__table__
#: The reconciler's lease: its own business, so not part of what a record shows.
_NOT_IN_RECORD = frozenset({"next_reconcile_at"})
#: Record fields that are not columns.
_NOT_COLUMNS = frozenset({"original_transaction_id"})


def _checked_columns() -> tuple[str, ...]:
    """The record's column names, once its fields are found to match the table's columns in
    name, type and nullability."""
    hints = get_type_hints(PaymentRecord)
    names = tuple(f.name for f in fields(PaymentRecord) if f.name not in _NOT_COLUMNS)
    expected = {column.name for column in PAYMENTS_TABLE.columns} - _NOT_IN_RECORD
    if set(names) != expected:
        raise TypeError(
            "PaymentRecord's fields differ from payment_transactions' columns: columns without"
            f" a field {sorted(expected - set(names))}, fields without a column"
            f" {sorted(set(names) - expected)}"
        )
    for name in names:
        column = PAYMENTS_TABLE.columns[name]
        hint = hints[name]
        members = get_args(hint) if isinstance(hint, UnionType) else (hint,)
        present = [member for member in members if member is not NoneType]
        fits = (
            len(present) == 1
            and (NoneType in members) == column.nullable
            and issubclass(get_origin(present[0]) or present[0], column.type.python_type)
        )
        if not fits:
            raise TypeError(f"PaymentRecord.{name}: {hint} does not fit the column {column!r}")
    return names


#: Record fields that are columns, by column name.
RECORD_COLUMNS = _checked_columns()
#: (column name, ORM attribute name) of each record column (``metadata`` is ``metadata_``).
_ATTRIBUTES = tuple(
    (column.name, attribute.key)
    for attribute in inspect(PaymentTransaction).column_attrs
    for column in attribute.columns
    if column.name in RECORD_COLUMNS
)
_TIMESTAMPS = tuple(
    name for name in RECORD_COLUMNS if PAYMENTS_TABLE.columns[name].type.python_type is datetime
)


def _defaults() -> tuple[dict[str, Any], tuple[tuple[str, Callable[[], Any]], ...]]:
    """The model's defaults of a new row: (constant values, (column, value maker) pairs).
    A nullable column without a default is ``None``; the primary key is the database's."""
    constants: dict[str, Any] = {}
    makers: list[tuple[str, Callable[[], Any]]] = []
    for column in PAYMENTS_TABLE.columns:
        default = column.default
        if column.primary_key:
            continue
        if default is None:
            if column.nullable and column.server_default is None:
                constants[column.name] = None
        elif default.is_scalar:
            constants[column.name] = default.arg  # type: ignore[attr-defined]
        elif default.is_callable:
            # SQLAlchemy wraps the model's callable to take an execution context it ignores.
            makers.append((column.name, partial(default.arg, None)))  # type: ignore[attr-defined]
        else:  # a SQL expression or a sequence: its value would be unknown to the record
            raise TypeError(f"payment_transactions.{column.name}: unsupported default {default!r}")
    return constants, tuple(makers)


_CONSTANT_DEFAULTS, _MADE_DEFAULTS = _defaults()


def with_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """A new payment's column values: ``values``, and the model's default of every column they
    leave out (the database's primary key aside), so the INSERT and the record are complete."""
    row = {**_CONSTANT_DEFAULTS, **values}
    for name, make in _MADE_DEFAULTS:
        if name not in values:
            row[name] = make()
    return row
