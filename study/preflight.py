"""Before a driver writes anything: the stores it was given answer, and let it in.

MLflow's client retries a refused connection for minutes and reports a refused login deep inside the first trial's
logging; Optuna fails on an unreachable database only after the study has recorded an experiment, which then needs a
`resume`. Here each becomes one error naming the option to fix, raised before the study directory is made.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request

import optuna
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.config import StudyConfig
from study.mlflow_server import PASSWORD_VAR, USERNAME_VAR, credentials
from study.paths import StudyPaths, StudyState


class TrackingAccessError(ValueError):
    """The MLflow server cannot be reached, or refuses this driver's credentials."""


def check_tracking_access(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast when a tracking server is down or refuses us; a local store needs no check."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s)
    except urllib.error.HTTPError:   # it answered (a proxy in front may want credentials even here)
        pass
    except OSError as err:   # URLError, HTTPError and timeouts are all OSErrors
        raise TrackingAccessError(f"cannot reach the MLflow server at {tracking_uri} (--tracking-uri): "
                                  f"{getattr(err, 'reason', err)}") from None
    try:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except MlflowException as err:
        if err.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise
        who = credentials(dict(os.environ))[0]
        given = f"as user {who!r}" if who else f"without credentials ({USERNAME_VAR} is not set)"
        raise TrackingAccessError(f"the MLflow server at {tracking_uri} refused this driver {given}: set "
                                  f"{USERNAME_VAR} and {PASSWORD_VAR} (or ~/.mlflow/credentials) to a user of "
                                  f"that server") from None


class OptunaStorageError(ValueError):
    """`study.optuna_storage` cannot be used: no driver for its database, no server answering, or a name taken."""


def shown_url(url: str) -> str:
    """A database URL as messages show it: without its password."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def check_optuna_storage(cfg: StudyConfig, paths: StudyPaths, timeout_s: int = 10) -> None:
    """Refuse, before the driver writes anything, a `study.optuna_storage` it cannot use.

    The database's driver module must be installed and its server must answer (else Optuna fails only after the
    study has recorded an experiment, which then needs a `resume`). A new study must not find its name taken: one
    database serves the studies of every study directory, and Optuna would silently join the other study's trials.
    The default, SQLite in the study directory, needs no check.
    """
    if not cfg.optuna_storage:
        return
    url, shown = cfg.optuna_storage, shown_url(cfg.optuna_storage)
    # libpq waits for an unreachable host as long as TCP does (minutes) unless told otherwise
    libpq = sqlalchemy.engine.make_url(url).drivername in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")
    timeout = {"connect_timeout": timeout_s} if libpq else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=timeout)
    except ImportError as err:
        raise OptunaStorageError(f"study.optuna_storage {shown}: its database driver is not installed ({err}); for "
                                 f"postgresql+psycopg:// install the postgres extra: pip install -e \".[postgres]\""
                                 ) from None
    except sqlalchemy.exc.ArgumentError as err:   # a dialect SQLAlchemy does not know
        raise OptunaStorageError(f"study.optuna_storage {shown}: {err}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as err:
        reason = " ".join(str(err.orig).split())
        raise OptunaStorageError(f"cannot reach the Optuna storage study.optuna_storage={shown}: {reason}") from None
    finally:
        engine.dispose()
    if StudyState.read(paths.state) is None and cfg.name in optuna.get_all_study_names(url):
        raise OptunaStorageError(
            f"study.optuna_storage {shown} already holds an Optuna study named {cfg.name!r}, but {paths.root} holds "
            f"no study: that one belongs to another study directory (or to one deleted since). Pick another "
            f"study.name, or delete it: optuna delete-study --study-name {cfg.name} --storage URL")
