"""Other tools' SQLite files in a study folder (Optuna's ``optuna.db``, MLflow's ``mlflow.db``, trackio's project):
checked before the tool opens them.

A file there may be garbage, truncated, or overwritten by hand; opened as it is, it becomes a long SQLAlchemy or
sqlite3 traceback. :func:`check_sqlite` refuses it in one sentence naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from stackwise_bench.errors import ConfigError

BUSY_S = 10.0  # another process writing the store (a parallel job): wait this long for its lock


def check_sqlite(path: str | os.PathLike, advice: str) -> None:
    """Refuse ``path`` where it exists and is not a readable SQLite database; ``advice``: what to do, a clause.

    A missing or empty file is fine (the tool creates its tables); a store busy with another writer is left to the
    tool, which waits on it itself.

    Raises:
        ConfigError: ``<path> is not a readable SQLite database (<why>); <advice>.``
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is not a SQLite database file but a folder; {advice}.")
        return
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=BUSY_S)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return
        found = str(exc)
    except sqlite3.DatabaseError as exc:
        found = str(exc)
    if found != "ok":
        raise ConfigError(f"{path} is not a readable SQLite database ({found}); {advice}.")


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///<path>`` URL (SQLAlchemy's form); None for any other storage (a server)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(url[len(prefix) :].split("?", 1)[0])
