"""`taskctl openapi`: the service's one OpenAPI document, built from both APIs' routes.

This is a composition root: it builds the command and the query app (placeholder
settings; building connects to nothing) and merges their own documents with
`shared.apidoc.merge`. `--write` stores the result in `shared/openapi.json`, which both
APIs serve; `--check` fails when that file is not what the routes give."""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Any

from shared import apidoc
from shared.settings import Settings

PLACEHOLDER = Settings(
    environment="test",
    database_url="postgresql://127.0.0.1:1/unused",
    better_auth_secret="placeholder-secret-for-building-the-document-only",
)


def own_documents() -> tuple[dict[str, Any], dict[str, Any]]:
    """The command app's and the query app's own documents (their routes only)."""
    from command_api.app import create_app as create_command_app  # noqa: PLC0415
    from query_api.app import create_app as create_query_app  # noqa: PLC0415

    return create_command_app(PLACEHOLDER).openapi(), create_query_app(PLACEHOLDER).openapi()


def service_document() -> dict[str, Any]:
    command, query = own_documents()
    return apidoc.merge(command, query, version=package_version("taskservice"))


def main(*, write: bool = False, check: bool = False) -> int:
    text = apidoc.render(service_document())
    if check:
        current = apidoc.DOCUMENT.read_text() if apidoc.DOCUMENT.exists() else ""
        if current != text:
            print(f"{apidoc.DOCUMENT} is out of date: run `taskctl openapi --write`")
            return 1
        print(f"{apidoc.DOCUMENT} is current")
        return 0
    if write:
        apidoc.DOCUMENT.write_text(text)
        print(f"wrote {apidoc.DOCUMENT}")
        return 0
    print(text, end="")
    return 0
