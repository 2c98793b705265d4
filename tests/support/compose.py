"""compose.yaml and deploy/nginx.conf as the tests read them (Docker does not run here):
the file parsed with PyYAML, `${VAR}` references interpolated the way Compose does,
and the nginx config rewritten to run on 127.0.0.1 from a temporary prefix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
ENV_EXAMPLE = ROOT / ".env.example"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(KeyError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return value or ""

    return _REFERENCE.sub(one, text)


def referenced_variables(text: str) -> set[str]:
    return {m.group(1) for m in _REFERENCE.finditer(text) if m.group(1)}


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml with its anchors merged; interpolated when `env` is given."""
    doc = yaml.safe_load(COMPOSE.read_text())
    if env is None:
        return doc
    return _walk(doc, env)


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def nginx_directive(conf: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", conf, re.MULTILINE)


def render_nginx_template(template: str, env: Mapping[str, str]) -> str:
    """What the nginx image's entrypoint makes of the template (its
    20-envsubst-on-templates.sh): `envsubst` of the variables that are set in the
    container's environment `env` and whose names match NGINX_ENVSUBST_FILTER; any other
    `$name` is left for nginx."""
    name_filter = re.compile(env.get("NGINX_ENVSUBST_FILTER", ""))
    names = {name for name in env if name_filter.search(name)}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return env[name] if name in names else match.group(0)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, template)


def gateway_conf(compose_env: Mapping[str, str], **overrides: str) -> str:
    """deploy/nginx.conf as compose's gateway container renders it from `compose_env`
    (what .env gives compose), with `overrides` in the container's environment."""
    gateway = load_compose(compose_env)["services"]["gateway"]
    assert any(v.startswith("./deploy/nginx.conf:/etc/nginx/templates/nginx.conf.template")
               for v in gateway["volumes"])
    env = {**service_environment(gateway), **overrides}
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"  # -> /etc/nginx/nginx.conf
    return render_nginx_template(NGINX_CONF.read_text(), env)


def nginx_for_test(
    conf: str, prefix: Path, listen_port: int, upstreams: Mapping[str, int]
) -> str:
    """The gateway config (rendered: `gateway_conf`), runnable by an
    unprivileged-looking nginx on 127.0.0.1: upstream hosts (`command-api:8001`) become
    `127.0.0.1:<port>`, the listen port a free one, the pid file and temp paths live
    under `prefix`, and nginx stays in the foreground (`daemon off`)."""
    assert "${CORS_" not in conf, "render the template first (gateway_conf)"
    for host, port in upstreams.items():
        conf, n = re.subn(rf"server\s+{re.escape(host)}:\d+;", f"server 127.0.0.1:{port};", conf)
        assert n == 1, f"no upstream server {host} in deploy/nginx.conf"
    conf, n = re.subn(r"listen\s+\d+;", f"listen 127.0.0.1:{listen_port};", conf)
    assert n == 1, "deploy/nginx.conf must listen on one port"
    conf = re.sub(r"^pid\s+[^;]+;", f"daemon off;\npid {prefix}/nginx.pid;", conf, flags=re.M)
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return conf.replace("http {", "http {\n" + temp, 1)
