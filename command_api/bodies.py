"""The HTTP request bodies of the command routes: pydantic models with their validators
and the JSON schemas the OpenAPI document shows (under these class names, which clients
generated from it use). `command_api.routes` turns a validated body into a command
(`command_api.commands`); the actor is never in a body (it comes from the token)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from shared.events import DESCRIPTION_MAX, TITLE_MAX


def _no_nul(value: str | None) -> str | None:
    """Text PostgreSQL and UTF-8 can hold: no NUL, and no lone surrogate (JSON's
    "\\ud800" escape parses to one, and it cannot be encoded)."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _title(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if len(value) > TITLE_MAX:
        raise ValueError(f"must be at most {TITLE_MAX} characters")
    _no_nul(value)
    return value


# The documented schemas say what the validators accept (a non-blank title, no NUL, no
# null where a field may only be left out), so clients and the fuzzer see the contract.
NO_NUL = "^[^\\u0000]*$"
TITLE_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": TITLE_MAX,
    "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$",
    "description": f"trimmed; 1-{TITLE_MAX} characters, not blank",
}
Title = Annotated[str, AfterValidator(_title), WithJsonSchema(TITLE_SCHEMA)]
Description = Annotated[
    str | None,
    Field(max_length=DESCRIPTION_MAX),
    AfterValidator(_no_nul),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "maxLength": DESCRIPTION_MAX, "pattern": NO_NUL}, {"type": "null"}]}
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CreateTask(_Body):
    title: Title
    description: Description = None


class ChangeTask(_Body):
    """PATCH: any of the fields; a field left out is left as it is."""

    title: Annotated[Title | None, WithJsonSchema(TITLE_SCHEMA)] = None
    description: Description = None
    completed: Annotated[bool | None, WithJsonSchema({"type": "boolean"})] = None

    @field_validator("title", "completed", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("must not be null")
        return value


class ReplaceTask(_Body):
    """PUT on the `/api/{user_id}/tasks/{id}` contract: title required, description
    replaced (null when left out), completed changed only when given."""

    title: Title
    description: Description = None
    completed: bool | None = None


class SetCompletion(_Body):
    completed: bool
