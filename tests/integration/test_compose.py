"""compose.yaml, read without Docker: every command is a real `taskctl` command, every
variable a real setting, no secret in the file, and the gateway's config agrees with
the services it fronts. (The gateway itself runs for real in tests/e2e/test_gateway.py.)"""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit

import pytest

from shared.settings import SETTING_NAMES, Settings, SettingsError
from taskctl.cli import (
    build_parser,
    cmd_command_api,
    cmd_db_init,
    cmd_projector,
    cmd_query_api,
)
from taskctl.dbinit import (
    COMMAND_ROLE,
    PASSWORD_VARIABLES,
    PROJECTOR_ROLE,
    QUERY_ROLE,
    ROLES,
    InitRefused,
    role_passwords,
)
from tests.support.compose import (
    COMPOSE,
    ENV_EXAMPLE,
    NGINX_CONF,
    ROOT,
    MissingVariable,
    load_compose,
    nginx_directive,
    referenced_variables,
    service_environment,
)

# Read by the processes directly rather than through Settings: argparse defaults
# (HOST, PORT) and uvicorn (FORWARDED_ALLOW_IPS).
PROCESS_VARIABLES = {"HOST", "PORT", "FORWARDED_ALLOW_IPS"}
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
# Read by `taskctl db init` only: the roles' passwords.
INIT_VARIABLES = set(PASSWORD_VARIABLES.values())
# Who each service connects as: init as the tables' owner, the others as their role.
SERVICE_ROLES = {"command-api": COMMAND_ROLE, "projector": PROJECTOR_ROLE,
                 "query-api": QUERY_ROLE}
TASKCTL_SERVICES = {
    "init": cmd_db_init,
    "command-api": cmd_command_api,
    "query-api": cmd_query_api,
    "projector": cmd_projector,
}
LONG_RUNNING = ("postgres", "command-api", "query-api", "projector", "gateway")
OPTIONAL = ("pgbouncer",)  # in a profile: started only when asked for


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def production_env() -> dict[str, str]:
    """.env.example as an operator would fill it in."""
    return {**env_example(), "POSTGRES_PASSWORD": secrets.token_hex(32),
            "BETTER_AUTH_SECRET": secrets.token_urlsafe(48),
            "DATA_MASTER_KEY": secrets.token_urlsafe(32),
            **{variable: secrets.token_hex(32) for variable in INIT_VARIABLES}}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(production_env())


def test_has_every_service(compose: dict):
    assert set(compose["services"]) == {*LONG_RUNNING, "init", *OPTIONAL}
    for name in OPTIONAL:
        assert compose["services"][name]["profiles"] == [name]


def test_the_pgbouncer_profile_moves_the_apis_only(compose: dict):
    """With the profile's two settings the APIs go through PgBouncer (transaction mode,
    DB_TRANSACTION_POOLER); init and the projector stay on postgres."""
    bouncer = compose["services"]["pgbouncer"]
    env = service_environment(bouncer)
    assert env["POOL_MODE"] == "transaction" and env["DB_HOST"] == "postgres"
    assert not bouncer.get("ports")
    moved = load_compose({**production_env(), "API_DATABASE_HOST": "pgbouncer:5432",
                          "DB_TRANSACTION_POOLER": "true"})
    for name in ("command-api", "query-api"):
        settings = Settings.from_env(service_environment(moved["services"][name]))
        assert settings.db_transaction_pooler is True
        assert "@pgbouncer:5432/" in (settings.database_url or "")
    for name in ("init", "projector"):
        url = service_environment(moved["services"][name])["DATABASE_URL"]
        assert "@postgres:5432/" in url
    for name in ("command-api", "query-api"):  # by default: direct, no pooler
        settings = Settings.from_env(service_environment(compose["services"][name]))
        assert settings.db_transaction_pooler is False


@pytest.mark.parametrize("name", sorted(TASKCTL_SERVICES))
def test_each_command_is_a_taskctl_command(compose: dict, name: str):
    command = compose["services"][name]["command"]
    assert command[0] == "taskctl"
    args = build_parser().parse_args(command[1:])
    assert args.func is TASKCTL_SERVICES[name]


@pytest.mark.parametrize("name", sorted(TASKCTL_SERVICES))
def test_each_variable_is_a_real_setting_and_valid(compose: dict, name: str):
    env = service_environment(compose["services"][name])
    unknown = set(env) - SETTING_NAMES - PROCESS_VARIABLES - (
        INIT_VARIABLES if name == "init" else set())
    assert not unknown, f"{name} sets variables no process reads: {sorted(unknown)}"
    # The values compose gives them pass the same validation the process runs at start.
    api = name in ("command-api", "query-api")
    settings = Settings.from_env(env, require_auth=api)
    assert settings.environment == "production"
    assert settings.database_url and "@postgres:5432/" in settings.database_url


def test_each_service_connects_as_its_role(compose: dict):
    services = compose["services"]
    owner = urlsplit(service_environment(services["init"])["DATABASE_URL"])
    assert owner.username == service_environment(services["postgres"])["POSTGRES_USER"]
    assert owner.username not in ROLES
    passwords = {}
    for name, role in SERVICE_ROLES.items():
        url = urlsplit(service_environment(services[name])["DATABASE_URL"])
        assert url.username == role, name
        assert (url.hostname, url.port, url.path) == (owner.hostname, owner.port, owner.path)
        passwords[role] = url.password
    # ... with the password init gives the role (and production accepts it).
    init_env = service_environment(services["init"])
    assert role_passwords(Settings.from_env(init_env, require_auth=False), init_env) == passwords
    assert set(SERVICE_ROLES.values()) == set(ROLES)


def test_the_shipped_role_passwords_are_refused_in_production():
    env = {**env_example(), "BETTER_AUTH_SECRET": secrets.token_urlsafe(48),
           "DATA_MASTER_KEY": secrets.token_urlsafe(32)}
    compose = load_compose({**env, "POSTGRES_PASSWORD": secrets.token_hex(32)})
    init_env = service_environment(compose["services"]["init"])
    with pytest.raises(InitRefused, match="COMMAND_DB_PASSWORD"):
        role_passwords(Settings.from_env(init_env, require_auth=False), init_env)


def test_the_shipped_master_key_is_refused():
    env = {**production_env(), "DATA_MASTER_KEY": env_example()["DATA_MASTER_KEY"]}
    compose = load_compose(env)
    for name in ("command-api", "projector", "init"):
        with pytest.raises(SettingsError, match="DATA_MASTER_KEY"):
            Settings.from_env(service_environment(compose["services"][name]),
                              require_auth=False)
    # The query API is never given it.
    assert "DATA_MASTER_KEY" not in service_environment(compose["services"]["query-api"])


def test_postgres_service(compose: dict):
    pg = compose["services"]["postgres"]
    image, _, tag = pg["image"].partition(":")
    assert image == "postgres" and int(tag.split(".")[0]) >= 16
    assert set(service_environment(pg)) <= POSTGRES_IMAGE_VARIABLES
    assert any(v.startswith("pgdata:/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pgdata" in compose["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_init_runs_once_and_everything_waits_for_it(compose: dict):
    services = compose["services"]
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["init"].get("restart", "no") == "no"
    for name in ("command-api", "query-api", "projector"):
        assert services[name]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully"
        )
    for name in ("command-api", "query-api"):
        assert services["gateway"]["depends_on"][name]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_health_checks_and_restart(compose: dict, name: str):
    service = compose["services"][name]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert service["healthcheck"]["test"]


@pytest.mark.parametrize("name", ["command-api", "query-api"])
def test_api_health_checks_probe_the_port_the_api_listens_on(compose: dict, name: str):
    service = compose["services"][name]
    args = build_parser().parse_args(service["command"][1:])
    probe = " ".join(service["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.port}/api/health" in probe


def test_projector_runs_two_replicas_with_a_metrics_health_check(compose: dict):
    projector = compose["services"]["projector"]
    assert projector["deploy"]["replicas"] == 2
    env = service_environment(projector)
    assert env["METRICS_PORT"] == "9100"
    assert "/health" in " ".join(projector["healthcheck"]["test"])
    assert "METRICS_PORT" in " ".join(projector["healthcheck"]["test"])


def test_no_secret_in_the_file():
    text = COMPOSE.read_text()
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        load_compose({})
    assert re.search(r"POSTGRES_PASSWORD:\s*\$\{POSTGRES_PASSWORD:\?", text)
    for variable in INIT_VARIABLES:  # required wherever used: never an empty password
        with pytest.raises(MissingVariable, match=variable):
            load_compose({k: v for k, v in production_env().items() if k != variable})
        uses = re.findall(rf"\$\{{{variable}([^}}]*)\}}", text)
        assert uses and all(u.startswith(":?") for u in uses), variable
    for name in ("BETTER_AUTH_SECRET", "POSTGRES_PASSWORD", *INIT_VARIABLES):
        for value in re.findall(rf"^\s*{name}:\s*(\S+)", text, re.MULTILINE):
            assert value.startswith("${"), f"{name} has a literal value in compose.yaml"


def test_env_example_documents_every_setting_and_variable():
    text = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert SETTING_NAMES <= documented, sorted(SETTING_NAMES - documented)
    assert referenced_variables(COMPOSE.read_text()) <= documented
    assert not env_example().get("BETTER_AUTH_SECRET")  # no usable secret shipped


def test_only_the_gateway_publishes_a_port(compose: dict):
    published = {name for name, s in compose["services"].items() if s.get("ports")}
    assert published == {"gateway"}
    assert compose["services"]["gateway"]["ports"][0].startswith("127.0.0.1:")


def test_gateway_config_agrees_with_the_services(compose: dict):
    gateway = compose["services"]["gateway"]
    assert gateway["image"].split(":")[0] == "nginx"
    # A template the image renders into /etc/nginx/nginx.conf with the CORS settings.
    assert "./deploy/nginx.conf:/etc/nginx/templates/nginx.conf.template:ro" in gateway["volumes"]
    env = service_environment(gateway)
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    api_env = service_environment(compose["services"]["command-api"])
    for name in ("CORS_ORIGINS", "CORS_ALLOW_HEADERS_EXTRA"):  # the APIs' values, and
        assert env[name] == api_env[name]                      # nothing else substituted
        assert re.search(env["NGINX_ENVSUBST_FILTER"], name)
    assert set(re.findall(r"\$\{(\w+)\}", NGINX_CONF.read_text())) == {
        "CORS_ORIGINS", "CORS_ALLOW_HEADERS_EXTRA"}
    conf = NGINX_CONF.read_text()
    for name in ("command-api", "query-api"):
        port = build_parser().parse_args(compose["services"][name]["command"][1:]).port
        assert f"server {name}:{port};" in conf
    # The body limit is the APIs' MAX_BODY_BYTES.
    (limit,) = nginx_directive(conf, "client_max_body_size")
    size = int(limit.rstrip("k")) * (1024 if limit.endswith("k") else 1)
    for name in ("command-api", "query-api"):
        assert int(service_environment(compose["services"][name])["MAX_BODY_BYTES"]) == size
    assert "X-Request-ID $req_id" in " ".join(nginx_directive(conf, "proxy_set_header"))
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in " ".join(
        nginx_directive(conf, "proxy_set_header")
    )
    # Only /api/ (the live stream's paths among them) and the OpenAPI document with its UI
    # are proxied: /metrics is nowhere public.
    proxied = re.findall(r"location\s+([^{]+)\{[^}]*proxy_pass", conf)
    assert [p.strip() for p in proxied] == [
        "/api/", r"~ ^/api/(?:[^/]+/)?tasks/stream(?:/tickets)?/?$", r"~ ^/(openapi\.json|docs)/?$"]


def test_the_image_builds_from_the_repository(compose: dict):
    assert compose["services"]["command-api"]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    assert "constraints.txt" in dockerfile and "USER " in dockerfile


# Where compose's fallback is meant to differ from the setting's default.
COMPOSE_OWN_DEFAULTS = {"METRICS_HOST": "0.0.0.0"}  # a container listens on every interface


def test_compose_falls_back_to_the_settings_defaults():
    """`${NAME:-fallback}` in compose.yaml equals Settings' default (an empty one: unset),
    so a deployment from compose behaves as the docs and .env.example say."""
    text = COMPOSE.read_text()
    checked = 0
    for name, variable, fallback in re.findall(r"^\s+([A-Z_]+): \$\{([A-Z_]+):-([^}]*)\}", text, re.M):
        field = Settings.model_fields.get(name.lower())
        if field is None or name != variable:
            continue
        checked += 1
        if name in COMPOSE_OWN_DEFAULTS:
            assert fallback == COMPOSE_OWN_DEFAULTS[name]
            continue
        default = field.default
        if default is None:
            assert fallback == "", name
        elif isinstance(default, bool):
            assert fallback.lower() == str(default).lower(), name
        elif isinstance(default, int | float):
            assert float(fallback) == default, (name, fallback, default)
        else:
            assert fallback == str(default), (name, fallback, default)
    assert checked >= 10
