"""The study's own MLflow server for a cluster: MLflow's basic-auth app, on loopback unless asked otherwise.

    g2-study mlflow-server --storage /shared/g2-studies [--host 127.0.0.1] [--port 5000]

The credentials are the ones the driver's MLflow client reads too: `MLFLOW_TRACKING_USERNAME` and
`MLFLOW_TRACKING_PASSWORD` from the environment, else MLflow's own `~/.mlflow/credentials` (a file only its owner
reads; what `ray up` and Ray Jobs need, having no terminal). On first start MLflow creates that user as its admin;
nothing secret is passed on a command line (`ps` shows command lines to every user of the machine). The server's own
files live in the storage: `mlflow.db` (runs), `mlartifacts/` (artifacts, proxied), `mlflow-auth/` (users).
"""
from __future__ import annotations

import configparser
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

USERNAME_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
MIN_PASSWORD_LENGTH = 12          # MLflow's own rule (mlflow.utils.validation._validate_password)
AUTH_DIR = "mlflow-auth"
DEFAULT_PORT = 5000

# Authenticated users may read every experiment (MLflow's default); unauthenticated requests get 401.
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {database_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def credentials(environ: dict[str, str]) -> tuple[str, str]:
    """(user, password) as MLflow's client finds them: the environment first, then ~/.mlflow/credentials."""
    stored = configparser.ConfigParser()
    stored.read(Path(environ.get("HOME", "~")).expanduser() / ".mlflow" / "credentials")
    section = stored["mlflow"] if stored.has_section("mlflow") else {}
    return (environ.get(USERNAME_VAR) or section.get(USERNAME_VAR.lower(), ""),
            environ.get(PASSWORD_VAR) or section.get(PASSWORD_VAR.lower(), ""))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:      # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class ServerLaunch:
    """What `mlflow server` is started with: its arguments, and the environment that carries the secrets."""
    argv: list[str]
    env: dict[str, str]
    url: str
    exposed: bool             # listens beyond this machine


def server_launch(storage: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                  backend_store_uri: str | None = None, environ: dict[str, str] | None = None) -> ServerLaunch:
    """The authenticated server of `storage`; a ValueError naming the variable when the credentials are missing."""
    environ = dict(os.environ if environ is None else environ)
    username, password = credentials(environ)
    if not username or not password:
        raise ValueError(f"set {USERNAME_VAR} and {PASSWORD_VAR} (the server's admin user, and the driver's "
                         f"credentials), in the environment or in ~/.mlflow/credentials (README, On a cluster)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"{PASSWORD_VAR} must be at least {MIN_PASSWORD_LENGTH} characters (MLflow's rule), "
                         f"got {len(password)}")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    root = Path(storage).expanduser().resolve()
    auth_dir = root / AUTH_DIR
    auth_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ini = auth_dir / "basic_auth.ini"
    ini.write_text(AUTH_INI.format(database_uri=f"sqlite:///{(auth_dir / 'users.db').as_posix()}"))
    env = {**environ,
           "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_ADMIN_USERNAME": username,
           "MLFLOW_AUTH_ADMIN_PASSWORD": password,      # used only while the user store is empty
           # CSRF protection of the UI's forms; with one worker a key per start is enough
           "MLFLOW_FLASK_SERVER_SECRET_KEY": environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", host,
            "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_store_uri or f"sqlite:///{(root / 'mlflow.db').as_posix()}",
            "--artifacts-destination", str(root / "mlartifacts")]
    shown = f"[{host}]" if ":" in host else host
    return ServerLaunch(argv, env, f"http://{shown}:{port}", exposed=not is_loopback(host))


def run(args) -> int:
    """`g2-study mlflow-server`: become the server (Ctrl-C and SIGTERM reach it directly)."""
    launch = server_launch(args.storage, args.host, args.port, args.backend_store_uri)
    print(f"MLflow server with authentication for {Path(args.storage).expanduser().resolve()}: {launch.url}  "
          f"(user ${USERNAME_VAR}; Ctrl-C stops it)", flush=True)
    if launch.exposed:
        print(f"warning: listening on {args.host}, beyond this machine. Only MLflow's basic auth protects it, and "
              f"plain HTTP carries the password in clear: put a TLS proxy in front, or keep the default "
              f"127.0.0.1 and reach it through `ssh -L {args.port}:127.0.0.1:{args.port} HEAD`", file=sys.stderr,
              flush=True)
    os.execve(sys.executable, launch.argv, launch.env)


def add_parser(sub) -> None:
    p = sub.add_parser("mlflow-server", help="an MLflow server with authentication for a cluster's studies "
                                             "(credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)")
    p.add_argument("--storage", required=True, help="the studies' shared directory (its MLflow store lives there)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: reach it through an SSH tunnel)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--backend-store-uri", help="the runs' store, e.g. postgresql+psycopg://USER@HOST/DB "
                                               "(default: sqlite in --storage)")
