"""Where studies live: a journal file (the embedded default), SQLite, or PostgreSQL for many machines.

- A path (``studies/cbp-bf.journal``, the default ``OUT/STUDY.journal``) is an Optuna journal file: an
  append-only log with file locking, so several processes on one machine (or a shared file system with
  working locks) can join one study. Optuna's journal storage has no heartbeat: a trial whose process
  was killed stays RUNNING until ``--requeue-running`` marks it failed and queues its parameters again.
- ``sqlite:///file.db`` is one process at a time: SQLite serialises writers with a file lock that
  parallel workers contend for (and that breaks on network file systems), so parallel use is refused.
- ``postgresql://user@host:port/db`` (any SQLAlchemy URL) is Optuna's RDB storage, the one to use
  across machines. RDB storages run with heartbeats: each running trial records one every
  ``heartbeat_interval`` seconds, and a trial silent for ``grace_period`` seconds (its worker was
  killed or lost) is marked FAIL and queued again with the same parameters by
  ``RetryHeartbeatStaleTrialCallback`` (system attrs ``failed_trial``, ``retry_history``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna

from dst.errors import ConfigError, DSTError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "GRACE_PERIOD",
    "MAX_RETRY",
    "StorageSpec",
    "resolve",
    "open_storage",
    "has_heartbeat",
    "check_parallel",
    "reporting_lost_storage",
]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
GRACE_PERIOD = 30  # seconds without a heartbeat after which a trial counts as dead
MAX_RETRY = 3  # times a dead trial's parameters are queued again
CONNECT_TIMEOUT = 5  # seconds to wait for a database server
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class StorageSpec:
    """A storage location: ``url`` (an SQLAlchemy URL or a journal file path) and its ``kind``."""

    url: str
    kind: str  # "journal", "sqlite" or "rdb"

    @property
    def display(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        if self.kind == "journal":
            return self.url
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:  # a malformed URL is reported when it is opened
            return self.url

    @property
    def parallel(self) -> bool:
        return self.kind != "sqlite"


def resolve(storage: str | None, out: str | Path, study: str) -> StorageSpec:
    """``--storage`` as given, or the default journal file ``OUT/STUDY.journal``."""
    if not storage:
        return StorageSpec(str(Path(out) / f"{study}.journal"), "journal")
    if storage.startswith("journal:"):  # explicit form journal:PATH (or journal:///PATH)
        path = storage[len("journal:"):]
        return StorageSpec(path[2:] if path.startswith("///") else path, "journal")
    if _URL.match(storage):
        return StorageSpec(storage, "sqlite" if storage.startswith("sqlite") else "rdb")
    return StorageSpec(storage, "journal")


def check_parallel(spec: StorageSpec, workers: int, command: str) -> None:
    """Refuse parallel workers on SQLite, pointing to the storages that take them."""
    if workers > 1 or command == "worker":
        if not spec.parallel:
            raise ConfigError(
                f"{spec.display}: SQLite takes one process at a time, so `studies {command}`"
                f"{f' with --workers {workers}' if workers > 1 else ''} cannot use it. On one machine use "
                "a journal file (--storage OUT/STUDY.journal, the default of `studies tune`); across "
                "machines use PostgreSQL (--storage postgresql://USER@HOST:PORT/DB)."
            )


def _retry_callback(max_retry: int):
    callback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if callback is None:  # optuna < 4.9
        callback = optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return callback(max_retry=max_retry)


def open_storage(
    spec: StorageSpec,
    *,
    create: bool = True,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    max_retry: int = MAX_RETRY,
) -> optuna.storages.BaseStorage:
    """Open (never wipe) the storage; an unreachable one is a ConfigError that says what to check."""
    if spec.kind == "journal":
        return _open_journal(Path(spec.url), create)
    import sqlalchemy.exc

    engine_kwargs: dict = {"pool_pre_ping": True}
    if spec.url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    if spec.kind == "sqlite" and not create:
        path = spec.url.split(":///", 1)[-1]
        if path and path != ":memory:" and not Path(path).exists():
            raise ConfigError(f"no study storage at {spec.display}: the file {path!r} does not exist")
    callback_key = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in optuna.storages.RDBStorage.__init__.__code__.co_varnames
        else "failed_trial_callback"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                _with_driver(spec.url),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                **{callback_key: _retry_callback(max_retry)},
            )
    except sqlalchemy.exc.OperationalError as err:
        reason = _reason(err)
        what = (
            "Check that the directory exists and is writable."
            if spec.kind == "sqlite"
            else "Check that the database server is running and reachable at that host and port, that "
            "the user, password and database name are right, and that the database exists (createdb NAME)."
        )
        raise ConfigError(f"cannot open study storage {spec.display}: {reason}. {what}") from None
    except sqlalchemy.exc.ArgumentError as err:
        raise ConfigError(f"malformed storage URL {spec.display}: {err}") from None
    except ImportError as err:
        raise ConfigError(
            f"storage {spec.display} needs a database driver that is not installed ({err}): "
            "pip install 'dst-plasticity[postgres]' (psycopg2) for PostgreSQL"
        ) from None


def _reason(err: BaseException) -> str:
    """The first line of a database error: the driver's own message, without SQLAlchemy's additions."""
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _lost_connection(err: BaseException) -> BaseException | None:
    """The database error behind ``err`` (following its causes and contexts: Optuna wraps it, and may
    fail again while handling it) when the storage stopped answering mid-run, else None."""
    import sqlalchemy.exc

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def reporting_lost_storage(spec: StorageSpec) -> Iterator[None]:
    """Turn a storage that stops answering mid-run (a database server stopped, restarted or out of
    reach) into a :class:`ConfigError` that says what was kept and how to continue, not a traceback."""
    try:
        yield
    except DSTError:
        raise
    except Exception as err:
        lost = _lost_connection(err)
        if lost is None:
            raise
        raise ConfigError(
            f"lost the study storage {spec.display} mid-run: {_reason(lost)}. The trials finished so far "
            "are kept there. Once it answers again (the server runs, the network is back), rerun the same "
            "command: it continues the study, and the trial that was running is marked FAIL by its "
            "heartbeat after --grace-period seconds and its parameters run again."
        ) from None


def _with_driver(url: str) -> str:
    """``postgresql://`` with the psycopg2 driver we depend on when psycopg 3 (SQLAlchemy 2.1's default
    for a bare ``postgresql://``) is not installed."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _open_journal(path: Path, create: bool) -> optuna.storages.BaseStorage:
    if path.is_dir():
        raise ConfigError(f"journal storage {str(path)!r} is a directory; give a file such as OUT/STUDY.journal")
    if not path.exists():
        if not create:
            raise ConfigError(
                f"no study storage at {str(path)!r}; give the storage the study was created in "
                "(--storage URL or journal file), or --out DIR holding STUDY.journal"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create {str(path.parent)!r} for the journal storage: {err}") from None
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore[attr-defined,no-redef]
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable Optuna journal file ({err}); it was left untouched") from None


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether dead trials in ``storage`` are detected (RDB storages with a heartbeat interval)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return bool(interval and interval())
