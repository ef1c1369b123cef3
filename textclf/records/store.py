"""The one file lock beside a local sqlite tracking store (``mlflow.db.lock``).

MLflow 3.17's sqlite store fails when two processes create (migrate) the same new database or the same
experiment at once, and when two promotions write alias ``champion`` at once (its unique key). Commands serialize
those moments with this lock; a tracking server needs none. (Two runs logging one new dataset at once race in
every store, a server's too: textclf.records.tracking.log_dataset logs it again instead.) Kept apart from
textclf.records.tracking, which imports torch: a registry command takes the lock without that import.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from textclf.errors import TextclfError


@contextlib.contextmanager
def sqlite_lock(uri: str | None = None, timeout: float = 300, first_contact: bool = False) -> Iterator[None]:
    """Hold the lock of the sqlite store at ``uri`` (default: the tracking URI); nothing for another store. With
    ``first_contact``, the database is created and migrated while the lock is held. Raises TextclfError when
    another command holds the lock for over ``timeout`` seconds."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock, Timeout

    path = uri[len("sqlite:///"):].split("?", 1)[0] + ".lock"
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise TextclfError(f"another textclf command has held {path} for over {timeout:.0f} s; try again") from None
    try:
        if first_contact:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates and migrates it
        yield
    finally:
        lock.release()
