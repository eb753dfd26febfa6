"""A host project like a shop that adopts the module: its own synchronous SQLAlchemy sessions, its
own Alembic history (head ``host_0001``: users and orders), its own bearer-token auth, and the
module's folder copied to ``app/payments/``.

Used by the shop's end-to-end test and by the README snippet test (its ``python`` blocks and
``cwd=host`` bash blocks run in this project, so README snippets can name ``SessionLocal``,
``get_db`` and ``get_current_user``, which it provides).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO_ROOT / "payments"
HOST_HEAD = "host_0001"

#: Tokens of the users the host's first revision seeds (``Authorization: Bearer <token>``).
CUSTOMER_TOKEN = "alice-token"
OTHER_CUSTOMER_TOKEN = "bob-token"
STAFF_TOKEN = "staff-token"

_FILES = {
    "app/__init__.py": "",
    "app/core/__init__.py": "",
    "app/core/database.py": '''
        """The shop's database: synchronous SQLAlchemy, like most existing FastAPI shops."""
        import os

        from sqlalchemy import create_engine
        from sqlalchemy.orm import DeclarativeBase, sessionmaker

        DATABASE_URL = os.environ.get("SHOP_DATABASE_URL", "sqlite:///./shop.db")
        engine = create_engine(DATABASE_URL)
        SessionLocal = sessionmaker(engine, expire_on_commit=False)


        class Base(DeclarativeBase):
            pass


        def get_db():
            db = SessionLocal()
            try:
                yield db
            finally:
                db.close()
    ''',
    "app/models.py": """
        from decimal import Decimal

        from sqlalchemy import Boolean, ForeignKey, Numeric, String
        from sqlalchemy.orm import Mapped, mapped_column

        from app.core.database import Base


        class User(Base):
            __tablename__ = "users"
            id: Mapped[int] = mapped_column(primary_key=True)
            email: Mapped[str] = mapped_column(String(200), unique=True)
            token: Mapped[str] = mapped_column(String(100), unique=True)
            is_staff: Mapped[bool] = mapped_column(Boolean, default=False)


        class Order(Base):
            __tablename__ = "orders"
            id: Mapped[int] = mapped_column(primary_key=True)
            user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
            amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
            status: Mapped[str] = mapped_column(String(20), default="pending")
            payment_id: Mapped[str | None] = mapped_column(String(50))
    """,
    "app/auth.py": '''
        """The shop's own bearer auth. The session is opened and closed inside the dependency
        (not ``Depends(get_db)``), so no connection stays checked out while a payment waits for
        the customer's PIN."""
        from dataclasses import dataclass

        from fastapi import Header, HTTPException
        from sqlalchemy import select

        from app.core.database import SessionLocal
        from app.models import User


        @dataclass
        class CurrentUser:
            id: int
            email: str
            is_staff: bool


        def get_current_user(authorization: str | None = Header(None)) -> CurrentUser:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(
                    401, "sign in first", headers={"WWW-Authenticate": 'Bearer realm="shop"'}
                )
            with SessionLocal() as db:
                user = db.scalar(select(User).where(User.token == token))
                if user is None:
                    raise HTTPException(
                        401, "unknown token", headers={"WWW-Authenticate": 'Bearer realm="shop"'}
                    )
                return CurrentUser(user.id, user.email, user.is_staff)
    ''',
    "app/payments_hooks.py": '''
        """The shop's payment hooks: a completed payment marks its order paid. (README.md's
        "React to outcomes" block writes this file over; the fixture has it for the blocks of
        payments/README.md and the shop's end-to-end test.)"""
        import asyncio

        from app.core.database import SessionLocal
        from app.models import Order
        from app.payments import PaymentService


        def mark_order_paid(order_id: int, transaction_id: str) -> None:
            with SessionLocal() as db, db.begin():
                order = db.get(Order, order_id)
                if order is not None:
                    order.status = "paid"
                    order.payment_id = transaction_id


        class ShopPayments(PaymentService):
            async def on_payment_completed(self, transaction):
                if transaction.entity_type == "order":
                    await asyncio.to_thread(
                        mark_order_paid, int(transaction.entity_id), transaction.transaction_id
                    )


        # Its sessions: what `python -m app.payments reconcile --service ...` works on.
        shop_payments = ShopPayments(sessions=SessionLocal)
    ''',
    ".env": """
        # The shop's settings. The simulator: nothing in a test may reach a real M-Pesa host.
        MPESA_ENVIRONMENT=simulator
        PAYMENT_ADMIN_API_KEY=shop-admin-key-0123456789
    """,
    "alembic.ini": """
        [alembic]
        script_location = %(here)s/alembic
        prepend_sys_path = .
        path_separator = os

        [loggers]
        keys = root

        [handlers]
        keys = console

        [formatters]
        keys = generic

        [logger_root]
        level = WARNING
        handlers = console

        [handler_console]
        class = StreamHandler
        args = (sys.stderr,)
        formatter = generic

        [formatter_generic]
        format = %(levelname)s %(name)s %(message)s
    """,
    "alembic/script.py.mako": '''
        """${message}

        Revision ID: ${up_revision}
        Revises: ${down_revision | comma,n}
        """
        from alembic import op
        import sqlalchemy as sa
        ${imports if imports else ""}
        revision = ${repr(up_revision)}
        down_revision = ${repr(down_revision)}
        branch_labels = ${repr(branch_labels)}
        depends_on = ${repr(depends_on)}


        def upgrade():
            ${upgrades if upgrades else "pass"}


        def downgrade():
            ${downgrades if downgrades else "pass"}
    ''',
    "alembic/env.py": """
        from alembic import context

        from app.core.database import Base, engine
        import app.models  # noqa: F401  (the shop's tables)

        target_metadata = Base.metadata
        # readme-test: into

        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    """,
    f"alembic/versions/{HOST_HEAD}_users.py": f'''
        """users and orders

        Revision ID: {HOST_HEAD}
        Revises:
        """
        import sqlalchemy as sa
        from alembic import op

        revision = "{HOST_HEAD}"
        down_revision = None
        branch_labels = None
        depends_on = None


        def upgrade():
            users = op.create_table(
                "users",
                sa.Column("id", sa.Integer(), primary_key=True),
                sa.Column("email", sa.String(200), nullable=False, unique=True),
                sa.Column("token", sa.String(100), nullable=False, unique=True),
                sa.Column("is_staff", sa.Boolean(), nullable=False),
            )
            op.create_table(
                "orders",
                sa.Column("id", sa.Integer(), primary_key=True),
                sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
                sa.Column("amount", sa.Numeric(12, 2), nullable=False),
                sa.Column("status", sa.String(20), nullable=False),
                sa.Column("payment_id", sa.String(50)),
            )
            op.bulk_insert(
                users,
                [
                    {{"id": 1, "email": "alice@example.com", "token": "{CUSTOMER_TOKEN}",
                      "is_staff": False}},
                    {{"id": 2, "email": "bob@example.com", "token": "{OTHER_CUSTOMER_TOKEN}",
                      "is_staff": False}},
                    {{"id": 3, "email": "staff@example.com", "token": "{STAFF_TOKEN}",
                      "is_staff": True}},
                ],
            )


        def downgrade():
            op.drop_table("orders")
            op.drop_table("users")
    ''',
}


def build_host_project(root: Path) -> Path:
    """Write the shop (without the module's migrations: adopting them is what the README and the
    tests show) and copy the module's folder to ``app/payments/``."""
    for relative, text in _FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    (root / "alembic/versions").mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        MODULE_DIR, root / "app/payments", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return root


def host_environment(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a process of the host: no ``PAYMENT_*``/``MPESA_*`` of the machine's
    and no ``PYTHONPATH`` (the host imports ``app.payments`` from its own folder)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MPESA_", "PAYMENT_")) and name != "PYTHONPATH"
    }
    env |= {
        "SHOP_DATABASE_URL": f"sqlite:///{root}/shop.db",
        "PAYMENT_LOG_DIR": str(root / "logs"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    env |= extra
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator_server(cwd: Path, *, pin_delay: float = 0.0) -> Iterator[str]:
    """The module's M-Pesa simulator as a real server on a loopback port (several processes, the
    host app and the reconcile command, then talk to the same M-Pesa)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "PAYMENT_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "payments",
            "simulator",
            "--port",
            str(port),
            "--pin-delay",
            str(pin_delay),
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/simulator/stats", timeout=1)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    stderr = process.stderr.read().decode() if process.stderr else ""
                    raise AssertionError(f"the simulator did not start: {stderr}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
