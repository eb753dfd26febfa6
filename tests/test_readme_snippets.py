"""Every fenced block of ``README.md`` and ``payments/README.md`` is run, extracted from the files
(nothing copied here), so a README that stops working fails CI.

The convention:

- ``bash`` blocks run with ``bash -e -o pipefail`` under a timeout, ``python`` on the PATH being
  this interpreter, in a fresh copy of the repository (or, with ``cwd=host``, in the host
  project of ``tests/host_project.py``); ``python`` blocks run in that host project (top-level
  ``await`` allowed); ``json`` blocks must parse (``model=Name``: and validate as
  ``payments.schemas.Name``); ``sql`` blocks run on a migrated PostgreSQL; ``text`` is not run.
  A fence without a language fails.
- Markers: an HTML comment right before the fence, ``<!-- readme-test: key=value ... -->``:
  ``skip="reason"`` (reason required), ``group=NAME`` (blocks run together, in order),
  ``cwd=host``, ``timeout=N``, ``model=Name``, ``into=PATH`` (a python block replacing the line
  ``# readme-test: into`` of PATH in the host project), ``file=PATH`` (a python block that is
  the whole of PATH in the host project), ``check=pyproject-dependencies`` (a text block that
  must list exactly the runtime dependencies and the ``[postgres]`` extra).
- Servers (``python -m payments serve|simulator``, anything with ``--loop N``) start in the
  background; ``127.0.0.1:8000``/``8001`` become free loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from payments import schemas
from tests.support import libpq_url as _libpq_url
from tests.support import postgres_admin_url

from .host_project import REPO_ROOT, build_host_project, free_port, host_environment

READMES = ("README.md", "payments/README.md")
RUN_LANGUAGES = {"bash", "python", "json", "sql", "text"}
KNOWN_KEYS = {"skip", "group", "cwd", "timeout", "model", "into", "file", "check"}
DEFAULT_TIMEOUT = 90
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:(?P<body>.*?)-->\s*$")
#: Commands that run until stopped: started in the background, stopped when the group ends.
_SERVER = re.compile(r"python -m (?:app\.)?payments (?:serve|simulator)\b|--loop\s+\d")
_INTO_LINE = "# readme-test: into"


@dataclass
class Block:
    readme: str
    line: int
    lang: str
    text: str
    marks: dict[str, str]

    @property
    def group(self) -> str:
        return self.marks.get("group") or f"line{self.line}"

    @property
    def is_file_edit(self) -> bool:
        return "into" in self.marks or "file" in self.marks


@dataclass
class Group:
    readme: str
    name: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        first = self.blocks[0]
        return f"{self.readme}:{first.line}:{self.name}"


def parse_marks(body: str, where: str) -> dict[str, str]:
    marks: dict[str, str] = {}
    for item in shlex.split(body):
        key, sep, value = item.partition("=")
        if not sep or key not in KNOWN_KEYS:
            raise AssertionError(f"{where}: unknown readme-test marker {item!r}")
        marks[key] = value
    return marks


def extract(readme: str) -> list[Block]:
    lines = (REPO_ROOT / readme).read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, lang = opening["indent"], opening["lang"]
        where = f"{readme}:{index + 1}"
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = _MARKER.match(previous)
        marks = parse_marks(marker["body"], where) if marker else {}
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        if index == len(lines):
            raise AssertionError(f"{where}: the fence is never closed")
        blocks.append(Block(readme, int(where.rpartition(":")[2]), lang, "\n".join(body), marks))
        index += 1
    return blocks


def groups_of(readme: str) -> list[Group]:
    groups: dict[str, Group] = {}
    for block in extract(readme):
        groups.setdefault(block.group, Group(readme, block.group)).blocks.append(block)
    return list(groups.values())


ALL_GROUPS = [group for readme in READMES for group in groups_of(readme)]


# --- the convention itself ----------------------------------------------------------------------


@pytest.mark.parametrize("readme", READMES)
def test_every_block_follows_the_convention(readme: str) -> None:
    problems = []
    for block in extract(readme):
        where = f"{readme}:{block.line}"
        if block.lang not in RUN_LANGUAGES:
            problems.append(f"{where}: fence language {block.lang!r} (use one of {RUN_LANGUAGES})")
        if "skip" in block.marks and len(block.marks["skip"].strip()) < 10:
            problems.append(f"{where}: a skipped block needs its reason")
        if block.is_file_edit and block.lang != "python":
            problems.append(f"{where}: into=/file= are for python blocks")
        if block.marks.get("cwd") not in (None, "host"):
            problems.append(f"{where}: cwd must be host")
    for group in groups_of(readme):
        kinds = {block.lang for block in group.blocks if not block.is_file_edit}
        if len(kinds - {"text", "json"}) > 1:
            problems.append(f"{group.id}: a group runs one language, not {sorted(kinds)}")
    assert problems == []


def test_the_extractor_sees_indented_blocks_and_markers() -> None:
    blocks = extract("payments/README.md")  # its blocks are indented inside a list
    python = next(block for block in blocks if block.lang == "python")
    assert python.text.startswith("from fastapi") and "\napp = FastAPI()" in python.text
    assert python.marks == {"group": "mount"}
    assert any(block.marks.get("cwd") == "host" for block in blocks)


# --- running them -------------------------------------------------------------------------------


class Workspace:
    """Per README: a copy of the repository, one host project shared by the README's blocks in
    document order (its Alembic block migrates it for the later ones), free ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = root / "repo"
        shutil.copytree(
            REPO_ROOT,
            self.repo,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "__pycache__", "*.pyc", "*.db", "*.db-*", "logs", ".pytest_cache"
            ),
        )
        self.host = build_host_project(root / "host")
        self.project = root / "project"
        (self.project / "app").mkdir(parents=True)
        self.home = root / "home"
        self.home.mkdir()
        self.gateway_port = free_port()
        self.simulator_port = free_port()
        self.admin_key = "readme-admin-key-0123456789"

    def environment(self, *, host: bool) -> dict[str, str]:
        env = host_environment(self.host)
        if not host:
            env.pop("SHOP_DATABASE_URL", None)
        env |= {
            "HOME": str(self.home),
            "PROJECT": str(self.project),
            "PAYMENT_ADMIN_API_KEY": self.admin_key,
            "PAYMENT_LOG_DIR": str(self.root / "logs"),
        }
        return env

    def rewrite(self, text: str) -> str:
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{self.gateway_port}")
        text = text.replace("127.0.0.1:8001", f"127.0.0.1:{self.simulator_port}")
        text = re.sub(r"--port 8000\b", f"--port {self.gateway_port}", text)
        return re.sub(r"--port 8001\b", f"--port {self.simulator_port}", text)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Workspace]]:
    made: dict[str, Workspace] = {}

    class Lazy(dict[str, Workspace]):
        def __missing__(self, readme: str) -> Workspace:
            made[readme] = self[readme] = Workspace(tmp_path_factory.mktemp("readme"))
            return made[readme]

    yield Lazy()


_BASH_PRELUDE = r"""
_snippet_pids="$SNIPPET_DIR/pids"
_snippet_wait_port() {
    for _ in $(seq 300); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    echo "readme-test: nothing answered on port $1 (see $2)" >&2; cat "$2" >&2; return 1
}
_snippet_wait_alive() {
    sleep 3
    kill -0 "$1" 2>/dev/null && return 0
    echo "readme-test: the command stopped (see $2)" >&2; cat "$2" >&2; return 1
}
"""


def logical_lines(script: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in script.split("\n"):
        pending += line
        if line.endswith("\\"):
            pending += "\n"
            continue
        out.append(pending)
        pending = ""
    if pending:
        out.append(pending)
    return out


def background_servers(script: str, workspace: Workspace) -> str:
    """Each server line, as it is, started in its own session in the background; the rest of
    the script waits until it answers (or, for ``--loop``, stays alive a few seconds)."""
    lines = []
    for number, line in enumerate(logical_lines(script)):
        command = line.split(" #", 1)[0].strip() if " #" in line else line.strip()
        if not command or command.startswith("#") or not _SERVER.search(command):
            lines.append(line)
            continue
        if re.search(r"payments serve\b", command) and "--port" not in command:
            command += f" --port {workspace.gateway_port}"
        if re.search(r"payments simulator\b", command) and "--port" not in command:
            command += f" --port {workspace.simulator_port}"
        log = f"$SNIPPET_DIR/server{number}.log"
        lines.append(f"setsid bash -c {shlex.quote(command)} >{log} 2>&1 &")
        lines.append('echo $! >>"$_snippet_pids"')
        port = re.search(r"--port (\d+)", command)
        if "--loop" in command or port is None:
            lines.append(f'_snippet_wait_alive $! "{log}"')
        else:
            lines.append(f'_snippet_wait_port {port.group(1)} "{log}"')
    return "\n".join(lines)


def stop_servers(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    for pid in pid_file.read_text().split():
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in pid_file.read_text().split():
        for _ in range(50):
            try:
                os.killpg(int(pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_bash(group: Group, workspace: Workspace, timeout: float) -> None:
    host = any(block.marks.get("cwd") == "host" for block in group.blocks)
    script = "\n".join(block.text for block in group.blocks if block.lang == "bash")
    script = background_servers(workspace.rewrite(script), workspace)
    run_dir = workspace.root / f"run-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir()
    env = workspace.environment(host=host) | {"SNIPPET_DIR": str(run_dir)}
    try:
        completed = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", _BASH_PRELUDE + "\n" + script],
            cwd=workspace.host if host else workspace.repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        stop_servers(run_dir / "pids")
    assert completed.returncode == 0, (
        f"{group.id} failed ({completed.returncode}):\n--- script\n{script}\n--- stdout\n"
        f"{completed.stdout[-4000:]}\n--- stderr\n{completed.stderr[-4000:]}"
    )


_PYTHON_RUNNER = """
import ast, asyncio, sys, types


class _RefuseTopLevelPayments:
    def find_spec(self, name, path=None, target=None):
        if name == "payments" or name.startswith("payments."):
            raise ImportError(f"a README snippet imported the top-level package: {name}")
        return None


sys.meta_path.insert(0, _RefuseTopLevelPayments())
source = open(sys.argv[1]).read()
code = compile(source, sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__main__"}
if code.co_flags & 0x80:  # CO_COROUTINE: the snippet awaits at top level
    asyncio.run(types.FunctionType(code, namespace)())
else:
    exec(code, namespace)
"""


def apply_file_edits(group: Group, workspace: Workspace) -> list[str]:
    """Write ``file=``/``into=`` blocks into the host project; returns modules to import."""
    imports = []
    for block in group.blocks:
        if "file" in block.marks:
            path = workspace.host / block.marks["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text + "\n")
            imports.append(block.marks["file"].removesuffix(".py").replace("/", "."))
        elif "into" in block.marks:
            path = workspace.host / block.marks["into"]
            original = path.read_text()
            assert _INTO_LINE in original, f"{path} has no '{_INTO_LINE}' line"
            path.write_text(original.replace(_INTO_LINE, block.text, 1))
    return imports


def run_python(group: Group, workspace: Workspace, source: str, timeout: float) -> None:
    runner = workspace.host / "_readme_runner.py"
    runner.write_text(_PYTHON_RUNNER)
    snippet = workspace.host / f"_readme_{uuid.uuid4().hex[:8]}.py"
    snippet.write_text(source)
    completed = subprocess.run(
        [sys.executable, str(runner), str(snippet)],
        cwd=workspace.host,
        env=workspace.environment(host=True),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, (
        f"{group.id} failed:\n--- code\n{source}\n--- stdout\n{completed.stdout[-4000:]}"
        f"\n--- stderr\n{completed.stderr[-4000:]}"
    )


def pyproject_dependencies() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["postgres"]]


def run_sql(group: Group) -> None:
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip("SQL blocks run on PostgreSQL (PAYMENT_TEST_POSTGRES_URL)")
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.engine import make_url

    admin = _libpq_url(admin)
    name = f"payments_readme_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        config = Config(str(REPO_ROOT / "alembic.ini"))
        config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
        config.cmd_opts = type("Options", (), {"x": [f"url={url}"]})()  # type: ignore[assignment]
        config.attributes["configure_logger"] = False
        command.upgrade(config, "heads")
        with psycopg.connect(url, autocommit=True) as connection:
            for block in group.blocks:
                for statement in block.text.split(";"):
                    if statement.strip() and not all(
                        line.strip().startswith("--") or not line.strip()
                        for line in statement.splitlines()
                    ):
                        connection.execute(statement).fetchall()
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize("group", ALL_GROUPS, ids=[group.id for group in ALL_GROUPS])
def test_readme_block_runs(group: Group, workspaces: dict[str, Workspace]) -> None:
    skipped = [block.marks["skip"] for block in group.blocks if "skip" in block.marks]
    if skipped:
        pytest.skip(f"marked in the README: {skipped[0]}")
    timeout = float(
        max((block.marks.get("timeout", DEFAULT_TIMEOUT) for block in group.blocks), key=float)
    )
    languages = {block.lang for block in group.blocks if not block.is_file_edit}
    runnable = [block for block in group.blocks if block.lang in ("bash", "python", "sql")]
    for block in group.blocks:
        if block.lang == "json":
            value = json.loads(block.text)
            model = block.marks.get("model")
            if model:
                getattr(schemas, model).model_validate(value)
        elif block.lang == "text" and block.marks.get("check") == "pyproject-dependencies":
            listed = [
                line.strip()
                for line in block.text.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
            assert listed == pyproject_dependencies()
    if not runnable:
        return
    workspace = workspaces[group.readme]
    imports = apply_file_edits(group, workspace)
    if "bash" in languages:
        run_bash(group, workspace, timeout)
    elif "python" in languages or imports:
        source = "\n\n".join(
            block.text
            for block in group.blocks
            if block.lang == "python" and not block.is_file_edit
        )
        source = "\n".join(f"import {module}" for module in imports) + "\n" + source
        run_python(group, workspace, textwrap.dedent(source), timeout)
    elif "sql" in languages:
        run_sql(group)
