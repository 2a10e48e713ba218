"""The Grafana dashboards of Smart Tuner: read them, list their PromQL, push them to Grafana.

The dashboards live as JSON in ``deploy/grafana/dashboards``. docker-compose's Grafana
loads them through file provisioning; ``smart-tuner grafana push`` uploads the same files
to any other Grafana over its HTTP API (folder created if missing, dashboards created or
overwritten), so there is one source for both.

Credentials for the push come from the environment only (a service account token in
``SMART_TUNER_GRAFANA_TOKEN``, or ``SMART_TUNER_GRAFANA_USER`` and
``SMART_TUNER_GRAFANA_PASSWORD``): never from a file in the repository, never from the
command line, where other users of the machine could read them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urljoin, urlsplit

import typer

from services.core.settings import DEFAULT_GRAFANA_URL, ENV_PREFIX, ConfigError, load_settings

if TYPE_CHECKING:
    from grafana_client import GrafanaApi

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
DEFAULT_FOLDER = "Smart Tuner"  # the folder the provisioning file puts them in, too
DEFAULT_TIMEOUT_S = 10.0
PUSH_MESSAGE = "smart-tuner grafana push"  # the version note Grafana keeps for each upload
MAX_ERROR_CHARS = 300  # of an error answer quoted in GrafanaPushError

# Settings (services.core.settings), named here as a user sets them.
URL_ENV = f"{ENV_PREFIX}GRAFANA_URL"
TOKEN_ENV = f"{ENV_PREFIX}GRAFANA_TOKEN"
USER_ENV = f"{ENV_PREFIX}GRAFANA_USER"
PASSWORD_ENV = f"{ENV_PREFIX}GRAFANA_PASSWORD"

REQUIRED_KEYS = {"uid": str, "title": str, "panels": list}
PROMETHEUS_TYPE = "prometheus"

# What ``substitute_variables`` puts in for Grafana's built-in interval variables: short
# enough for a test's few minutes of data, and a rate window of at least four scrapes at
# Prometheus's default 15 s interval.
TEST_INTERVAL = "1m"
TEST_RANGE = "5m"
_BUILTIN_VALUES = {"__rate_interval": TEST_INTERVAL, "__interval": TEST_INTERVAL,
                   "__range": TEST_RANGE}
RUN_VARIABLE = "run"
# ``$name`` or ``${name}`` (also ``${name:format}``). ``\w+`` is greedy, so ``$__interval_ms``
# is its own (unknown, untouched) variable rather than ``$__interval`` followed by ``_ms``.
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
# Prometheus variable queries that are Grafana functions, not PromQL.
_NOT_PROMQL_QUERY = re.compile(r"^\s*(?:label_names|label_values|metrics)\s*\(")
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((.*)\)\s*$", re.DOTALL)


class GrafanaPushError(RuntimeError):
    """Grafana refused, failed or could not be reached; the message names what was pushed."""


# --------------------------------------------------------------------------- dashboards


def load_dashboards(directory: Path = DASHBOARD_DIR) -> list[dict[str, Any]]:
    """Parse every ``*.json`` in ``directory`` (sorted by name), checking it is a dashboard.

    Each must be a JSON object with a non-empty ``uid`` and ``title`` and a ``panels`` list,
    and uids must be unique. Raises ValueError naming the file otherwise, or when the
    directory holds no dashboard at all.
    """
    files = sorted(directory.glob("*.json"))
    if not files:
        raise ValueError(f"no dashboards (*.json) in {directory}")
    dashboards: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path in files:
        try:
            board = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not readable as JSON: {error}") from None
        if not isinstance(board, dict):
            raise ValueError(f"{path}: a dashboard is a JSON object, got {type(board).__name__}")
        for key, kind in REQUIRED_KEYS.items():
            value = board.get(key)
            if not isinstance(value, kind) or (kind is str and not value.strip()):
                raise ValueError(f"{path}: needs {key!r} as a non-empty {kind.__name__}")
        uid = board["uid"]
        if uid in seen:
            raise ValueError(f"{path}: uid {uid!r} is already used by {seen[uid]}")
        seen[uid] = path.name
        dashboards.append(board)
    return dashboards


def _is_prometheus(datasource: Any) -> bool:
    """Whether queries on ``datasource`` are PromQL.

    Only a datasource reference that names another type says no: a missing one is the
    default datasource, and a bare uid or a ``${datasource}`` variable is Prometheus in
    these dashboards.
    """
    if isinstance(datasource, dict) and datasource.get("type"):
        return datasource["type"] == PROMETHEUS_TYPE
    return True


def _all_panels(panels: list[Any]) -> Iterator[dict[str, Any]]:
    """Every panel, depth first; a collapsed row keeps its panels inside its own ``panels``."""
    for panel in panels:
        if isinstance(panel, dict):
            yield panel
            yield from _all_panels(panel.get("panels") or [])


def _variable_promql(query: Any) -> str | None:
    """The PromQL of a Prometheus template variable's query, None when it has none."""
    if isinstance(query, dict):  # the query editor's form: {"query": "...", "qryType": n}
        query = query.get("query")
    if not isinstance(query, str) or not query.strip() or _NOT_PROMQL_QUERY.match(query):
        return None
    inner = _QUERY_RESULT.match(query)
    # Grafana runs any other query as a series selector, which is PromQL too.
    return inner.group(1).strip() if inner else query.strip()


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of ``dashboard``, in document order.

    Panel targets (also of panels nested in collapsed rows), annotation queries (``expr``
    or ``target.expr``) and Prometheus template variables whose query is PromQL
    (``query_result(...)``'s inner query, or a series selector; ``label_values(...)``,
    ``label_names()`` and ``metrics(...)`` are Grafana functions and give nothing).
    Queries on other datasource types are left out. Template variables stay as written.
    """
    expressions: list[str] = []
    for panel in _all_panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            datasource = target.get("datasource") or panel.get("datasource")
            expr = target.get("expr")
            if isinstance(expr, str) and expr.strip() and _is_prometheus(datasource):
                expressions.append(expr)
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        if not _is_prometheus(annotation.get("datasource")):
            continue
        expr = annotation.get("expr") or (annotation.get("target") or {}).get("expr")
        if isinstance(expr, str) and expr.strip():
            expressions.append(expr)
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query" and _is_prometheus(variable.get("datasource")):
            expr = _variable_promql(variable.get("query"))
            if expr:
                expressions.append(expr)
    return expressions


def substitute_variables(expr: str, run_id: str) -> str:
    """``expr`` as Grafana would send it to Prometheus for run ``run_id`` (for tests).

    ``$run``/``${run}`` becomes the run id (escaped for a double-quoted PromQL string),
    ``$__rate_interval`` and ``$__interval`` become 1m, ``$__range`` 5m. Other variables
    are left as they are.
    """
    quoted_run = run_id.replace("\\", "\\\\").replace('"', '\\"')

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name == RUN_VARIABLE:
            return quoted_run
        return _BUILTIN_VALUES.get(name, match.group(0))

    return _VARIABLE.sub(value, expr)


# --------------------------------------------------------------------------------- push


def _credential(token: str | None, user: str | None,
                password: str | None) -> str | tuple[str, str]:
    """grafana-client's credential: a token, or a (user, password) pair for basic auth."""
    if token and (user or password):
        raise ValueError("give Grafana a token or a user and password, not both")
    if token:
        return token
    if user and password:
        return (user, password)
    raise ValueError(f"no Grafana credentials: set {TOKEN_ENV} (a service account token), "
                     f"or {USER_ENV} and {PASSWORD_ENV}")


def _connect(url: str, credential: str | tuple[str, str], timeout_s: float) -> GrafanaApi:
    """A client for the Grafana at ``url`` (``http(s)://host[:port][/sub/path]``)."""
    from grafana_client import GrafanaApi  # imported here: only a push needs it

    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the URL holds a secret.
        raise ValueError(f"credentials do not belong in the Grafana URL: set {TOKEN_ENV}, "
                         f"or {USER_ENV} and {PASSWORD_ENV}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL of Grafana: {url!r}")
    host = parts.hostname
    if ":" in host:  # an IPv6 address goes back into brackets
        host = f"[{host}]"
    # grafana-client appends "api" to the prefix as is: a sub-path needs its trailing slash.
    prefix = parts.path.strip("/")
    return GrafanaApi(credential, host=host, port=parts.port,
                      url_path_prefix=f"{prefix}/" if prefix else "",
                      protocol=parts.scheme, timeout=timeout_s)


def _describe(error: Exception, url: str) -> str:
    """One line on why a request failed, with what Grafana said when it answered."""
    from grafana_client.client import GrafanaException

    if isinstance(error, GrafanaException) and error.status_code:
        response = error.response
        said = response.get("message") if isinstance(response, dict) else response
        # A proxy's error page can be long HTML; its start is enough to tell what it is.
        said = str(said or error.message)[:MAX_ERROR_CHARS]
        return f"Grafana answered HTTP {error.status_code}: {said}"
    return f"no answer from Grafana at {url}: {error}"


def _push_errors() -> tuple[type[Exception], ...]:
    """What a grafana-client call raises: its own errors, or niquests' (OSError) ones."""
    from grafana_client.client import GrafanaException

    return (GrafanaException, OSError)


def _ensure_folder(api: GrafanaApi, title: str, url: str) -> str:
    """The uid of the top-level folder called ``title``, created when there is none."""
    try:
        for folder in api.folder.get_all_folders():
            if folder.get("title") == title:
                return str(folder["uid"])
        created = api.folder.create_folder(title)
        log.info("created Grafana folder %r (uid %s)", title, created.get("uid"))
        return str(created["uid"])
    except _push_errors() as error:
        raise GrafanaPushError(f"folder {title!r}: {_describe(error, url)}") from error
    except (KeyError, TypeError, AttributeError) as error:
        raise GrafanaPushError(f"folder {title!r}: unexpected answer from Grafana at {url}: "
                               f"{error!r}") from error


def push_dashboards(url: str, token: str | None = None, user: str | None = None,
                    password: str | None = None, folder: str = DEFAULT_FOLDER,
                    directory: Path = DASHBOARD_DIR,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Create or update every dashboard of ``directory`` in ``folder`` of the Grafana at ``url``.

    Authenticates with ``token`` (sent as a Bearer header) or ``user`` and ``password``
    (basic auth). The folder is created when no top-level folder has that title; each
    dashboard is saved with ``overwrite`` so a second push updates it in place. Returns, for
    each dashboard, the URL Grafana answered (made absolute), or its uid when it gave none.

    Raises ValueError for bad arguments or dashboard files (before anything is sent), and
    GrafanaPushError naming the folder or dashboard when Grafana refuses or cannot be
    reached; dashboards before the failing one stay pushed.
    """
    if not folder.strip():
        raise ValueError("the Grafana folder needs a title")
    dashboards = load_dashboards(directory)
    api = _connect(url, _credential(token, user, password), timeout_s)
    try:
        return _push_all(api, dashboards, folder, url)
    finally:
        # grafana-client has no close of its own; its HTTP session holds pooled sockets.
        session = getattr(api.client, "s", None)
        if session is not None:
            session.close()


def _push_all(api: GrafanaApi, dashboards: list[dict[str, Any]], folder: str,
              url: str) -> list[str]:
    """Ensure the folder, then save each dashboard in it; the URLs Grafana answered."""
    folder_uid = _ensure_folder(api, folder, url)
    pushed: list[str] = []
    for board in dashboards:
        name = f"dashboard {board['uid']!r} ({board['title']})"
        payload = {
            # id null: Grafana finds the dashboard by uid, whatever id it has there.
            "dashboard": {**board, "id": None},
            "folderUid": folder_uid,
            "overwrite": True,
            "message": PUSH_MESSAGE,
        }
        try:
            answer = api.dashboard.update_dashboard(payload)
        except _push_errors() as error:
            raise GrafanaPushError(f"{name}: {_describe(error, url)}") from error
        if not isinstance(answer, dict) or not (answer.get("url") or answer.get("uid")):
            raise GrafanaPushError(f"{name}: unexpected answer from Grafana at {url}: "
                                   f"{answer!r}")
        where = urljoin(url, answer["url"]) if answer.get("url") else str(answer["uid"])
        log.info("pushed %s to %s (version %s)", name, where, answer.get("version"))
        pushed.append(where)
    return pushed


# ---------------------------------------------------------------------------------- CLI


def grafana_push(
    url: Annotated[str | None, typer.Option(
        help=f"Grafana's base URL [default: ${URL_ENV} or {DEFAULT_GRAFANA_URL}]")] = None,
    user: Annotated[str | None, typer.Option(
        help=f"basic-auth user [default: ${USER_ENV}] (password from ${PASSWORD_ENV}); "
        f"leave unset with ${TOKEN_ENV}")] = None,
    folder: Annotated[str, typer.Option(help="folder the dashboards go in")] = DEFAULT_FOLDER,
    directory: Annotated[Path, typer.Option(
        "--dir", help="folder of dashboard JSON files", file_okay=False)] = DASHBOARD_DIR,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each answer", min=0.1)]
    = DEFAULT_TIMEOUT_S,
) -> None:
    """Create or update the Smart Tuner dashboards in a running Grafana.

    Credentials are settings (environment or .env): SMART_TUNER_GRAFANA_TOKEN (a service
    account token), or SMART_TUNER_GRAFANA_USER and SMART_TUNER_GRAFANA_PASSWORD. Prints
    each dashboard's URL.
    """
    try:
        settings = load_settings()
    except ConfigError as error:
        typer.echo(f"smart-tuner grafana push: {error}", err=True)
        raise typer.Exit(code=2) from None
    token, password = settings.grafana_token, settings.grafana_password
    try:
        urls = push_dashboards(
            url or settings.grafana_url,
            token=token.get_secret_value() if token else None,
            user=user or settings.grafana_user,
            password=password.get_secret_value() if password else None,
            folder=folder, directory=directory, timeout_s=timeout)
    except ValueError as error:
        typer.echo(f"smart-tuner grafana push: {error}", err=True)
        raise typer.Exit(code=2) from None
    except GrafanaPushError as error:
        typer.echo(f"smart-tuner grafana push: {error}", err=True)
        raise typer.Exit(code=1) from None
    for where in urls:
        typer.echo(where)


def register(app: typer.Typer) -> None:
    """Attach ``grafana push`` to the top-level CLI."""
    grafana_app = typer.Typer(help="Grafana dashboards of Smart Tuner.", no_args_is_help=True)
    grafana_app.command("push")(grafana_push)
    app.add_typer(grafana_app, name="grafana")
