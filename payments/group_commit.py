"""One SQLite transaction for a batch of the module's own write units: each unit in a savepoint,
one COMMIT for all.

``database.run_db(..., write=True)`` hands a worker thread the write units that queued up while
the previous batch ran. Committed one by one, each unit paid SQLite's commit (the WAL frames of
every page it touched, written again by the next unit) and SQLAlchemy's connection checkout,
transaction and return to the pool: about a third of the worker thread's CPU in a burst.

What a caller sees does not change: a unit's result or error reaches it only after the COMMIT,
so nothing it was told is committed can be lost, and a unit that fails is rolled back to its
savepoint alone. A failed COMMIT, or a transaction SQLite ended by itself (it rolls the whole
transaction back on a full disk or an I/O error), fails every unit that ran in it, so no caller
believes in rows that are not there.

Only sessions the module made itself (``ModuleDatabase``) are batched: their units never hold a
connection between them, so each can borrow the batch's connection for one unit. A host's
sessions run one transaction per unit, as before.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from .repository.statements import BATCH_CONNECTION

#: Each unit's savepoint (one at a time: a unit's ends before the next one's begins).
_UNIT_SAVEPOINT = "payments_unit"

#: The savepoint statements as ``sqlite3`` is sent them, the unit's and SQLAlchemy's alike.
_SAVEPOINT = "SAVEPOINT {}"
_RELEASE = "RELEASE SAVEPOINT {}"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT {}"

Unit = tuple[contextvars.Context, Session, Callable[[Session], Any]]
Outcome = tuple[bool, Any]


def run_in_one_transaction(
    engine: Engine, units: list[Unit], run_unit: Callable[[Session, Callable[[Session], Any]], Any]
) -> list[Outcome]:
    """Run ``units`` (module sessions of ``engine``) in one transaction; each outcome is
    ``(True, result)`` or ``(False, exception)``, in order. ``run_unit`` runs one unit as the
    worker thread runs it alone (``database._threaded_unit``)."""
    try:
        with engine.connect() as connection:
            driver = connection.connection.dbapi_connection
            try:
                # The write lock, taken once for the batch (a deferred BEGIN would take it at
                # the first write, and a reader's snapshot could then be refused the upgrade).
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                outcomes, ended = _units_in(connection, engine, units, run_unit)
                if not ended:
                    connection.commit()
            except BaseException:
                # A COMMIT SQLite refused (a deferred constraint) leaves the transaction open,
                # and SQLAlchemy would return the connection to the pool that way.
                if driver is not None and driver.in_transaction:
                    driver.rollback()
                raise
    except BaseException as error:  # BEGIN or COMMIT failed: nothing of the batch is stored
        return [(False, error)] * len(units)
    if not ended:
        return outcomes
    # SQLite ended the transaction by itself: what ran in it is gone, and its callers are told
    # so (a unit that failed keeps its own error); the units not yet run run alone.
    gone = _transaction_ended()
    told = [(False, value if not ok else gone) for ok, value in outcomes]
    return told + [outcome_of(unit, run_unit) for unit in units[len(outcomes) :]]


def _units_in(
    connection: Connection,
    engine: Engine,
    units: list[Unit],
    run_unit: Callable[[Session, Callable[[Session], Any]], Any],
) -> tuple[list[Outcome], bool]:
    """Run units on ``connection`` until one leaves its transaction ended: the outcomes so far,
    and whether the transaction ended."""
    driver = connection.connection.dbapi_connection
    if driver is None:
        return [], True
    outcomes: list[Outcome] = []
    for unit in units:
        session = unit[1]
        mode = session.join_transaction_mode
        # The unit's savepoint, on the driver: the money path's statements run in it without
        # the session beginning a transaction of its own (SQLAlchemy's begin and commit of a
        # savepoint cost more CPU than the unit's statements). What a unit does through the ORM
        # still runs in a savepoint of the session's, inside this one.
        driver.execute(_SAVEPOINT.format(_UNIT_SAVEPOINT))
        session.bind = connection
        session.join_transaction_mode = "create_savepoint"
        session.info[BATCH_CONNECTION] = connection
        try:
            outcome = outcome_of(unit, run_unit)
        finally:
            session.info.pop(BATCH_CONNECTION, None)
            session.bind = engine
            session.join_transaction_mode = mode
        if not driver.in_transaction:
            outcomes.append(outcome)
            return outcomes, True
        try:
            if not outcome[0]:
                driver.execute(_ROLLBACK_TO.format(_UNIT_SAVEPOINT))
            driver.execute(_RELEASE.format(_UNIT_SAVEPOINT))
        except BaseException as error:
            # The unit's rows can no longer be told apart from the batch's: end the batch, so
            # every unit in it is told nothing of it was stored.
            driver.rollback()
            outcomes.append((False, error) if outcome[0] else outcome)
            return outcomes, True
        outcomes.append(outcome)
    return outcomes, False


def outcome_of(unit: Unit, run_unit: Callable[[Session, Callable[[Session], Any]], Any]) -> Outcome:
    """Run one unit in its caller's context: ``(True, result)``, or ``(False, exception)`` to
    hand to its caller (as ``asyncio.to_thread`` would)."""
    context, session, work = unit
    try:
        return True, context.run(run_unit, session, work)
    except BaseException as error:
        return False, error


def savepoints_on_the_driver(engine: Engine) -> None:
    """Send ``engine``'s SAVEPOINT, RELEASE and ROLLBACK TO statements straight to the driver.

    SQLAlchemy compiles a new clause object and runs its whole statement machinery for each of
    them: 116 µs of CPU per savepoint and release, where the same two statements on the
    ``sqlite3`` connection take 9 µs (each unit of a batch has one of each). The names are
    SQLAlchemy's own (``sa_savepoint_N``), and ``sqlite3`` passes these statements through as
    they are, as it did before."""

    def sent_as(template: str) -> Callable[[Connection, str], None]:
        def send(connection: Connection, name: str) -> None:
            connection.connection.driver_connection.execute(template.format(name))  # type: ignore[union-attr]

        return send

    # On this engine's dialect instance only (create_engine makes one per engine).
    dialect: Any = engine.dialect
    dialect.do_savepoint = sent_as(_SAVEPOINT)
    dialect.do_release_savepoint = sent_as(_RELEASE)
    dialect.do_rollback_to_savepoint = sent_as(_ROLLBACK_TO)


def _transaction_ended() -> OperationalError:
    return OperationalError(
        "COMMIT",
        None,
        RuntimeError("SQLite rolled the write batch's transaction back; nothing of it was stored"),
    )
