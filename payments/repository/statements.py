"""The money path's INSERTs and version-guarded UPDATE, run once or twice per payment.

On the module's two drivers (the stdlib ``sqlite3``, and asyncpg through SQLAlchemy's adapter)
they go to the driver's cursor, inside the session's transaction: the SQL is SQLAlchemy's own,
compiled once per dialect and set of columns, and each value is converted by its type's own bind
processor, so the rows are exactly what SQLAlchemy writes. That skips SQLAlchemy's execution
machinery (compiled-cache lookup, execution context, result set), which cost as much CPU per
statement as SQLite itself. Errors are raised as SQLAlchemy raises them. On any other driver
they are ordinary Core statements on the session.

On PostgreSQL each statement is a round trip, so the rows of one table go as one INSERT of that
many rows, and an event with its deliveries as one statement (``insert_together``). A unit's
last write (a payment with its first audit row; an outcome's UPDATE with its audit rows, events
and deliveries) is one statement too, and when nothing of the transaction has reached the server
yet it goes alone and commits itself: no BEGIN and COMMIT round trips (``final=True``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ValuesBase
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.util.concurrency import await_

#: Drivers whose cursor takes SQLAlchemy's compiled SQL as it is (positional parameters).
_DIRECT_DRIVERS = {("sqlite", "pysqlite"), ("postgresql", "asyncpg")}


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    #: The parameters' names, in the order the SQL takes them.
    order: tuple[str, ...]
    #: The parameters that need converting, by position: (index, the type's bind processor).
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect, names: Sequence[str]) -> _Compiled:
        compiled = statement.compile(dialect=dialect, column_keys=list(names))
        order = tuple(compiled.positiontup or ())
        found = [
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in order
        ]
        processors = tuple((i, process) for i, process in enumerate(found) if process is not None)
        return cls(compiled.string, order, processors)

    def values(self, *parameter_sets: Mapping[str, Any]) -> list[list[Any]] | None:
        """Each set of parameters in the SQL's order, converted; ``None`` if one lacks a value
        (say an ``onupdate`` column the caller left to SQLAlchemy: Core then runs it)."""
        rows = []
        for parameters in parameter_sets:
            try:
                values = [parameters[name] for name in self.order]
            except KeyError:
                return None
            for index, process in self.processors:
                values[index] = process(values[index])
            rows.append(values)
        return rows


#: ``Session.info`` key: the connection of the session's current transaction (see ``_direct``).
_CURRENT = "payments_statements_connection"

#: ``Session.info`` key: the connection of the write batch the session's unit runs in, inside the
#: unit's own savepoint (``group_commit``). The statements go to it without beginning the
#: session's transaction, which would cost more than the statements themselves.
BATCH_CONNECTION = "payments_batch_connection"


def _direct(session: Session) -> tuple[Connection, bool]:
    """The session's connection (its transaction begun), and whether its driver is one of ours.
    Kept for the rest of the transaction: ``Session.connection()`` costs more than a statement's
    own Python on the driver, and a payment's transaction asks three or four times."""
    if session.autoflush and (session.new or session.dirty or session.deleted):
        session.flush()  # what Session.execute does first: pending ORM rows go in before ours
    batch = session.info.get(BATCH_CONNECTION)
    if batch is not None:
        return batch, True
    transaction = session.get_transaction()
    kept = session.info.get(_CURRENT)
    if transaction is not None and kept is not None and kept[0]() is transaction:
        return kept[1], kept[2]
    connection = session.connection()
    dialect = connection.dialect
    direct = (dialect.name, dialect.driver) in _DIRECT_DRIVERS
    # A weak reference: the transaction refers to the session, so a strong one would make every
    # session a reference cycle, left for the garbage collector's full collections to free.
    session.info[_CURRENT] = (weakref.ref(session.get_transaction()), connection, direct)
    return connection, direct


class _DriverCursor:
    """``with _DriverCursor(connection, sql, values) as cursor``: a cursor of the connection's
    driver; its errors raised as SQLAlchemy raises them (``IntegrityError`` for a key used
    before, ``OperationalError`` for a locked file, …). A class rather than a generator: it is
    entered for every statement of a payment, and a generator's context manager costs more."""

    __slots__ = ("connection", "cursor", "sql", "values")

    def __init__(self, connection: Connection, sql: str, values: Any) -> None:
        self.connection, self.sql, self.values = connection, sql, values

    def __enter__(self) -> Any:
        self.cursor = self.connection.connection.cursor()
        return self.cursor

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        self.cursor.close()
        if error is None:
            return
        if isinstance(error, self.connection.dialect.loaded_dbapi.Error):
            raise _as_sqlalchemy_error(self.connection, self.sql, self.values, error) from error


def _as_sqlalchemy_error(
    connection: Connection, sql: str, values: Any, error: BaseException
) -> DBAPIError:
    """A DBAPI error of the connection's driver as SQLAlchemy raises it."""
    dialect = connection.dialect
    return DBAPIError.instance(sql, values, error, dialect.loaded_dbapi.Error, dialect=dialect)


class _Shapes:
    """Compiled forms of one statement, per dialect and set of columns (a handful occur)."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, tuple[str, ...]], _Compiled] = {}

    def get(self, dialect: Dialect, names: tuple[str, ...]) -> _Compiled:
        key = (dialect.name, names)
        found = self._compiled.get(key)
        if found is None:
            found = self._compiled[key] = _Compiled.of(self.statement, dialect, names)
        return found


class RowInsert:
    """``INSERT INTO table`` of complete rows (every column but an autoincrement key)."""

    def __init__(self, table: Table) -> None:
        self.statement: ValuesBase = insert(table)
        autoincrement = table.autoincrement_column
        self.key = autoincrement.name if autoincrement is not None else None
        self.names = tuple(c.name for c in table.columns if c.name != self.key)
        self._rows = _Shapes(self.statement)
        self._row_with_key = _Shapes(
            self.statement.returning(table.c[self.key]) if self.key else self.statement
        )
        #: asyncpg: the one-row SQL's ``count``-row form (``None``: not possible), by (one-row
        #: SQL, count).
        self._several_rows: dict[tuple[str, int], str | None] = {}

    def one(self, session: Session, row: Mapping[str, Any]) -> Any:
        """Insert one row; its new autoincrement key (``None`` for a table without one)."""
        connection, direct = _direct(session)
        # SQLite reports the new key itself; PostgreSQL returns it.
        returning = self.key is not None and connection.dialect.name != "sqlite"
        shapes = self._row_with_key if returning else self._rows
        compiled = shapes.get(connection.dialect, self.names) if direct else None
        values = compiled.values(row) if compiled is not None else None
        if compiled is None or values is None:
            result = session.execute(self.statement, dict(row))
            return result.inserted_primary_key[0] if self.key else None
        with _DriverCursor(connection, compiled.sql, values) as cursor:
            cursor.execute(compiled.sql, values[0])
            if self.key is None:
                return None
            return cursor.fetchone()[0] if returning else cursor.lastrowid

    def one_with(
        self,
        session: Session,
        row: Mapping[str, Any],
        children: RowInsert,
        child_rows: Sequence[Mapping[str, Any]],
        key: str,
    ) -> Any:
        """Insert one row and ``child_rows`` whose column ``key`` is the new row's key (a
        payment and its first audit row), as the unit's last write (see ``final``); the new
        key. On asyncpg one statement; elsewhere ``one`` and ``many``."""
        connection, direct = _direct(session)
        if direct and self.key and child_rows and connection.dialect.name != "sqlite":
            parent = self._row_with_key.get(connection.dialect, self.names)
            parent_values = parent.values(row)
            names = tuple(name for name in children.names if name != key)
            child = children._rows.get(connection.dialect, names)
            child_values = child.values(*child_rows)
            children_insert = (
                children._one_statement(child, child_values) if child_values is not None else None
            )
            if parent_values is not None and children_insert is not None:
                child_sql, flat_child_values = children_insert
                sql = _with_parent_sql(parent.sql, len(parent.order), child_sql, self.key, key)
                return _final_value(connection, sql, parent_values[0] + flat_child_values)
        pk = self.one(session, row)
        children.many(session, [{**child, key: pk} for child in child_rows])
        return pk

    def many(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        connection, direct = _direct(session)
        compiled = self._rows.get(connection.dialect, self.names) if direct else None
        values = compiled.values(*rows) if compiled is not None else None
        if compiled is None or values is None:
            session.execute(self.statement, [dict(row) for row in rows])
            return
        with _DriverCursor(connection, compiled.sql, values) as cursor:
            if connection.dialect.name == "sqlite":
                cursor.executemany(compiled.sql, values)
                return
            # asyncpg: a statement is a round trip, and its executemany costs more than a few
            # runs of the prepared statement; the rows here are one to four (an outcome's audit
            # rows, an event's deliveries), so they go as one INSERT of that many rows.
            one = self._one_statement(compiled, values)
            if one is None:
                for row in values:
                    cursor.execute(compiled.sql, row)
            else:
                cursor.execute(*one)

    def _one_statement(
        self, compiled: _Compiled, values: list[list[Any]]
    ) -> tuple[str, list[Any]] | None:
        """PostgreSQL: the SQL and parameters that insert every row of ``values`` at once."""
        key = (compiled.sql, len(values))
        if key not in self._several_rows:
            self._several_rows[key] = (
                compiled.sql if len(values) == 1 else rows_sql(compiled.sql, len(values))
            )
        sql = self._several_rows[key]
        return (sql, [value for row in values for value in row]) if sql is not None else None

    def _prepared(
        self, connection: Connection, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[str, list[Any]] | None:
        compiled = self._rows.get(connection.dialect, self.names)
        values = compiled.values(*rows)
        return self._one_statement(compiled, values) if values is not None else None


def insert_together(
    session: Session,
    first: tuple[RowInsert, Sequence[Mapping[str, Any]]],
    then: tuple[RowInsert, Sequence[Mapping[str, Any]]],
) -> None:
    """The rows of two tables (an event and its deliveries); ``then``'s rows may reference
    ``first``'s. On asyncpg one statement, the first INSERT in a ``WITH`` (a round trip fewer;
    a foreign key is checked at the end of the statement, after both)."""
    (first_table, first_rows), (then_table, then_rows) = first, then
    if first_rows and then_rows:
        connection, direct = _direct(session)
        if direct and connection.dialect.name != "sqlite":
            parts = first_table._prepared(connection, first_rows)
            rest = then_table._prepared(connection, then_rows)
            if parts is not None and rest is not None:
                head_sql, head_values = parts
                head_sql = head_sql.partition(" RETURNING ")[0]
                sql = f"WITH written AS ({head_sql}) {_shifted(rest[0], len(head_values))}"
                values = head_values + rest[1]
                with _DriverCursor(connection, sql, values) as cursor:
                    cursor.execute(sql, values)
                return
    first_table.many(session, first_rows)
    then_table.many(session, then_rows)


_PLACEHOLDER = re.compile(r"\$(\d+)")


def _shifted(sql: str, by: int) -> str:
    """``sql`` with each numbered placeholder ``$n`` as ``$(n + by)``."""
    return _PLACEHOLDER.sub(lambda m: f"${int(m.group(1)) + by}", sql)


def rows_sql(one_row_sql: str, count: int) -> str | None:
    """``INSERT … VALUES ($1, …, $k) [RETURNING …]`` as ``VALUES ($1, …, $k), ($k+1, …), …``
    for ``count`` rows (PostgreSQL's numbered placeholders); ``None`` if the SQL is not that
    shape."""
    head, values_keyword, rest = one_row_sql.partition(" VALUES ")
    row, returning_keyword, returning = rest.partition(" RETURNING ")
    numbers = [int(n) for n in _PLACEHOLDER.findall(row)]
    width = len(numbers)
    if not values_keyword or not (row.startswith("(") and row.endswith(")")) or not width:
        return None
    if numbers != list(range(1, width + 1)) or ")" in row[:-1]:
        return None  # not one plain row of placeholders (casts are ``$1::VARCHAR``, no parens)

    rows = ", ".join(_shifted(row, index * width) for index in range(count))
    return head + values_keyword + rows + returning_keyword + returning


def _insert_parts(sql: str) -> tuple[str, str]:
    """``INSERT INTO t (a, b) VALUES rows [RETURNING …]`` as ``INSERT INTO t (a, b)`` and
    ``rows``."""
    head, _, rest = sql.partition(" VALUES ")
    return head, rest.partition(" RETURNING ")[0]


@lru_cache(maxsize=256)
def _with_parent_sql(
    parent_sql: str, parent_width: int, child_sql: str, parent_key: str, key: str
) -> str:
    """PostgreSQL: the parent's INSERT (``RETURNING`` its key) in a ``WITH``, then the child
    rows' INSERT (without their ``key`` column) taking that key as ``key``; the statement
    returns the key."""
    head, rows = _insert_parts(child_sql)
    into, _, columns = head.partition(" (")
    return (
        f"WITH parent AS ({parent_sql}) {into} ({key}, {columns}"
        f" SELECT parent.{parent_key}, v.* FROM parent, (VALUES {_shifted(rows, parent_width)})"
        f" AS v RETURNING {key}"
    )


@lru_cache(maxsize=256)
def _guarded_sql(update_sql: str, update_width: int, inserts: tuple[tuple[str, int], ...]) -> str:
    """PostgreSQL: the guarded UPDATE in a ``WITH``, each INSERT (its SQL, its parameter count)
    writing only if the UPDATE changed the row; the statement returns how many rows it changed."""
    parts = [f"guarded AS ({update_sql} RETURNING 1)"]
    offset = update_width
    for index, (sql, width) in enumerate(inserts):
        head, rows = _insert_parts(sql)
        parts.append(
            f"written_{index} AS ({head} SELECT * FROM (VALUES {_shifted(rows, offset)}) AS v"
            " WHERE EXISTS (SELECT FROM guarded))"
        )
        offset += width
    return "WITH " + ", ".join(parts) + " SELECT count(*) FROM guarded"


def _final_value(connection: Connection, sql: str, values: list[Any]) -> Any:
    """asyncpg: run the unit's last write, ``sql``, and return its one value. It goes to asyncpg
    itself, not SQLAlchemy's cursor, which would first send BEGIN: when the transaction has sent
    nothing yet, the statement commits by itself (a statement is atomic), and the session's
    commit has nothing to send. Inside a begun transaction it is one more statement of it."""
    try:
        return await_(connection.connection.driver_connection.fetchval(sql, *values))
    except Exception as error:
        try:  # asyncpg's error as the adapter's DBAPI error (IntegrityError, …), as a cursor would
            connection.connection.dbapi_connection._handle_exception(error)  # type: ignore[union-attr]
        except connection.dialect.loaded_dbapi.Error as translated:
            raise _as_sqlalchemy_error(connection, sql, values, translated) from error
        raise


class GuardedUpdate:
    """``UPDATE table SET … WHERE id = :b_pk AND version = :b_version AND status = :b_status``:
    the new values, if nobody changed the row since it was read. ``run`` answers how many rows
    it changed (1, or 0 when the row moved on)."""

    def __init__(self, table: Table) -> None:
        self.statement = update(table).where(
            table.c.id == bindparam("b_pk"),
            table.c.version == bindparam("b_version"),
            # The status too: a hand-made UPDATE (an operator's SQL) may not bump the version.
            table.c.status == bindparam("b_status"),
        )
        self._shapes = _Shapes(self.statement)

    def run(
        self,
        session: Session,
        pk: int,
        expected_version: int,
        expected_status: str,
        changes: Mapping[str, Any],
        *,
        then: Sequence[tuple[RowInsert, Sequence[Mapping[str, Any]]]] = (),
        final: bool = False,
    ) -> int:
        """``then``: rows written only if the row changed (its audit rows, events, deliveries).
        ``final``: this is the unit's last write; on asyncpg it and ``then`` are one statement,
        committed by itself when the transaction has sent nothing yet (``_final_value``)."""
        parameters = {
            **changes,
            "b_pk": pk,
            "b_version": expected_version,
            "b_status": expected_status,
        }
        connection, direct = _direct(session)
        compiled = self._shapes.get(connection.dialect, tuple(changes)) if direct else None
        values = compiled.values(parameters) if compiled is not None else None
        if compiled is None or values is None:
            result = session.execute(self.statement, parameters)
            changed = int(result.rowcount)  # type: ignore[attr-defined]
        else:
            folded = (
                self._folded(connection, compiled, values[0], then)
                if final and connection.dialect.name != "sqlite"
                else None
            )
            if folded is not None:
                return int(_final_value(connection, *folded))
            with _DriverCursor(connection, compiled.sql, values) as cursor:
                cursor.execute(compiled.sql, values[0])
                changed = int(cursor.rowcount)
        if changed == 1:
            for table, rows in then:
                table.many(session, rows)
        return changed

    @staticmethod
    def _folded(
        connection: Connection,
        compiled: _Compiled,
        values: list[Any],
        then: Sequence[tuple[RowInsert, Sequence[Mapping[str, Any]]]],
    ) -> tuple[str, list[Any]] | None:
        """The UPDATE and ``then``'s rows as one statement and its parameters (``None``: one
        of the INSERTs cannot be written so)."""
        inserts: list[tuple[str, int]] = []
        all_values = list(values)
        for table, rows in then:
            if not rows:
                continue
            prepared = table._prepared(connection, rows)
            if prepared is None:
                return None
            inserts.append((prepared[0], len(prepared[1])))
            all_values += prepared[1]
        return _guarded_sql(compiled.sql, len(values), tuple(inserts)), all_values
