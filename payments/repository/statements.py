"""The money path's INSERTs and version-guarded UPDATE, run once per payment.

On SQLite (the stdlib driver) they go to the driver itself, inside the session's transaction:
SQL built once per table, each value converted by its column type's own bind processor, so the
rows are byte for byte what SQLAlchemy would write. That skips SQLAlchemy's execution machinery
(compiled-cache lookup, execution context, result set), which cost as much CPU per statement as
SQLite itself. On any other database they are ordinary Core statements on the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

#: The columns whose values need converting, by position: (index, the type's bind processor).
_Processors = tuple[tuple[int, Callable[[Any], Any]], ...]


def _driver_connection(session: Session) -> tuple[Connection, Any | None]:
    """The session's connection (its transaction begun), and the stdlib ``sqlite3`` connection
    under it when that is what it is."""
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "sqlite" and dialect.driver == "pysqlite":
        return connection, connection.connection.driver_connection
    return connection, None


@contextmanager
def _as_sqlalchemy_errors(connection: Connection, sql: str, values: Any) -> Iterator[None]:
    """The driver's errors as SQLAlchemy raises them (``IntegrityError`` for a key used before,
    ``OperationalError`` for a locked file, …), which is what callers catch."""
    dbapi_error = connection.dialect.loaded_dbapi.Error
    try:
        yield
    except dbapi_error as error:
        raise DBAPIError.instance(
            sql, values, error, dbapi_error, dialect=connection.dialect
        ) from error


def _processors(table: Table, names: Sequence[str], dialect: Dialect) -> _Processors:
    found = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
    return tuple((index, process) for index, process in enumerate(found) if process is not None)


def _converted(row: Mapping[str, Any], names: Sequence[str], processors: _Processors) -> list[Any]:
    values = [row[name] for name in names]
    for index, process in processors:
        values[index] = process(values[index])
    return values


class RowInsert:
    """``INSERT INTO table`` of complete rows: every column but an autoincrement key."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.statement = insert(table)
        self.names = tuple(
            column.name
            for column in table.columns
            if not (column.primary_key and column.autoincrement is not False and _is_int(column))
        )
        self._prepared: tuple[str, _Processors] | None = None

    def one(self, session: Session, row: Mapping[str, Any]) -> Any:
        """Insert one row; its new primary key (an autoincrement one, else ``None``)."""
        connection, driver = _driver_connection(session)
        if driver is None:
            result = connection.execute(self.statement, dict(row))
            return result.inserted_primary_key[0] if result.inserted_primary_key else None
        sql, processors = self._for(connection)
        values = _converted(row, self.names, processors)
        with _as_sqlalchemy_errors(connection, sql, values):
            cursor = driver.execute(sql, values)
        return cursor.lastrowid if len(self.names) < len(self.table.columns) else None

    def many(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        connection, driver = _driver_connection(session)
        if driver is None:
            connection.execute(self.statement, [dict(row) for row in rows])
            return
        sql, processors = self._for(connection)
        values = [_converted(row, self.names, processors) for row in rows]
        with _as_sqlalchemy_errors(connection, sql, values):
            driver.executemany(sql, values)

    def _for(self, connection: Connection) -> tuple[str, _Processors]:
        if self._prepared is None:
            dialect = connection.dialect
            quote = dialect.identifier_preparer.quote
            sql = (
                f"INSERT INTO {dialect.identifier_preparer.format_table(self.table)}"
                f" ({', '.join(quote(name) for name in self.names)})"
                f" VALUES ({', '.join('?' for _ in self.names)})"
            )
            self._prepared = sql, _processors(self.table, self.names, dialect)
        return self._prepared


class GuardedUpdate:
    """``UPDATE table SET … WHERE id = ? AND version = ? AND status = ?``: the new values, if
    nobody changed the row since it was read. ``run`` answers how many rows it changed."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.statement = update(table).where(
            table.c.id == bindparam("b_pk"),
            table.c.version == bindparam("b_version"),
            # The status too: a hand-made UPDATE (an operator's SQL) may not bump the version.
            table.c.status == bindparam("b_status"),
        )
        #: Per set of columns: the SQL and its columns' processors (a handful of shapes occur).
        self._shapes: dict[tuple[str, ...], tuple[str, _Processors]] = {}
        self._key_processors: _Processors | None = None

    def run(
        self,
        session: Session,
        pk: int,
        expected_version: int,
        expected_status: str,
        changes: Mapping[str, Any],
    ) -> int:
        connection, driver = _driver_connection(session)
        if driver is None:
            parameters = {
                **changes,
                "b_pk": pk,
                "b_version": expected_version,
                "b_status": expected_status,
            }
            return connection.execute(self.statement, parameters).rowcount
        names = tuple(changes)
        shape = self._shapes.get(names)
        if shape is None:
            preparer = connection.dialect.identifier_preparer
            assignments = ", ".join(f"{preparer.quote(name)} = ?" for name in names)
            sql = (
                f"UPDATE {preparer.format_table(self.table)} SET {assignments}"
                " WHERE id = ? AND version = ? AND status = ?"
            )
            shape = self._shapes[names] = (sql, _processors(self.table, names, connection.dialect))
        sql, processors = shape
        if self._key_processors is None:
            self._key_processors = _processors(
                self.table, ("id", "version", "status"), connection.dialect
            )
        keys = {"id": pk, "version": expected_version, "status": expected_status}
        values = _converted(changes, names, processors)
        values += _converted(keys, ("id", "version", "status"), self._key_processors)
        with _as_sqlalchemy_errors(connection, sql, values):
            return int(driver.execute(sql, values).rowcount)


def _is_int(column: Any) -> bool:
    try:
        return column.type.python_type is int
    except NotImplementedError:
        return False
