"""A throw-away PostgreSQL 15 on a free loopback port, for the shared-study tests.

``python tests/pg_server.py start DIR`` prints ``export LESIONLAB_TEST_PG_URL=...`` for a shell
(.ci/run evals it); ``python tests/pg_server.py stop DIR`` stops it. The test fixture starts
one itself when the variable is unset. Needs the server binaries and root (to run them as the
``postgres`` user).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def available() -> str | None:
    """None when a server can be started here, else the reason it cannot."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {PG_BIN}"
    if os.geteuid() != 0:
        return "starting PostgreSQL needs root (to run it as the postgres user)"
    if shutil.which("su") is None:
        return "no su to run PostgreSQL as the postgres user"
    return None


def _as_postgres(cmd: str) -> None:
    subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", cmd], check=True,
                   capture_output=True, timeout=120)


def start(root: Path) -> str:
    """initdb into ``root`` and start the server; returns its SQLAlchemy URL."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    _as_postgres(f"{PG_BIN}/initdb -D {data} -A trust -U postgres")
    _as_postgres(f"{PG_BIN}/pg_ctl -D {data} -l {root}/log -w -o "
                 f"\"-p {port} -h 127.0.0.1 -k {root}\" start")
    _as_postgres(f"{PG_BIN}/createdb -h 127.0.0.1 -p {port} -U postgres lesionlab")
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/lesionlab"


def stop(root: Path) -> None:
    """Stop the server started in ``root`` (fast shutdown)."""
    _as_postgres(f"{PG_BIN}/pg_ctl -D {root / 'data'} -m fast -w stop")


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(f"export LESIONLAB_TEST_PG_URL={start(folder)}")
    else:
        stop(folder)
