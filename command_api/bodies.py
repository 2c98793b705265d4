"""The HTTP request bodies of the command routes: pydantic models with their validators
and the JSON schemas the OpenAPI document shows (under these class names, which clients
generated from it use). `command_api.routes` turns a validated body into a command
(`command_api.commands`); the actor is never in a body (it comes from the token)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from shared.events import (
    DEFAULT_PRIORITY,
    DESCRIPTION_MAX,
    PRIORITIES,
    TAG_MAX,
    TAG_PATTERN,
    TAGS_MAX,
    TITLE_MAX,
    Priority,
    normal_tags,
    parse_due_date,
)


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


def _tags(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("must be a list of strings")
    return tuple(normal_tags(value))


def _due_date(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string (an ISO 8601 date-time or a date) or null")
    return parse_due_date(value)


PRIORITY_SCHEMA = {
    "type": "string",
    "enum": list(PRIORITIES),
    "description": " < ".join(PRIORITIES),
}
TAGS_SCHEMA = {
    "type": "array",
    "maxItems": TAGS_MAX,
    "items": {"type": "string", "minLength": 1, "maxLength": TAG_MAX,
              "pattern": TAG_PATTERN},
    "description": (
        f"at most {TAGS_MAX} tags of 1-{TAG_MAX} characters, not blank; stored trimmed"
        " and lowercased, duplicates dropped, in the order given"
    ),
}
DUE_DATE_SCHEMA = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "date"},
        {"type": "null"},
    ],
    "description": (
        "ISO 8601; stored and shown in UTC (an offset is converted, none means UTC, a"
        " date alone is its midnight UTC); years 1 to 9999 once in UTC; null: no due date"
    ),
}
PriorityName = Annotated[Priority, WithJsonSchema(PRIORITY_SCHEMA)]
Tags = Annotated[tuple[str, ...], BeforeValidator(_tags), WithJsonSchema(TAGS_SCHEMA)]
DueDate = Annotated[datetime | None, BeforeValidator(_due_date), WithJsonSchema(DUE_DATE_SCHEMA)]
# Fields added after Idempotency-Key fingerprints were first stored: a fingerprint
# covers them only when they are not at their defaults (`command_api.routes`).
ADDED_FIELDS = ("priority", "tags", "due_date")


def _optional(schema: dict[str, Any]) -> None:
    """No `default` in the document: generated clients (openapi-typescript) take a
    property with a default for a required one. The description says the default."""
    schema.pop("default", None)


LEFT_OUT_PRIORITY = Field(
    description=f"{PRIORITY_SCHEMA['description']}; {DEFAULT_PRIORITY} when left out",
    json_schema_extra=_optional,
)
LEFT_OUT_TAGS = Field(
    description=f"{TAGS_SCHEMA['description']}; none when left out", json_schema_extra=_optional
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CreateTask(_Body):
    title: Title
    description: Description = None
    priority: Annotated[PriorityName, LEFT_OUT_PRIORITY] = DEFAULT_PRIORITY
    tags: Annotated[Tags, LEFT_OUT_TAGS] = ()
    due_date: DueDate = None


class ChangeTask(_Body):
    """PATCH: any of the fields; a field left out is left as it is."""

    title: Annotated[Title | None, WithJsonSchema(TITLE_SCHEMA)] = None
    description: Description = None
    completed: Annotated[bool | None, WithJsonSchema({"type": "boolean"})] = None
    priority: Annotated[PriorityName | None, WithJsonSchema(PRIORITY_SCHEMA)] = None
    tags: Annotated[Tags | None, WithJsonSchema(TAGS_SCHEMA)] = None
    due_date: DueDate = None

    @field_validator("title", "completed", "priority", "tags", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("must not be null")
        return value


class ReplaceTask(_Body):
    """PUT: title required; description, priority, tags and due date replaced (by their
    defaults when left out: null, medium, none, null); completed changed only when
    given."""

    title: Title
    description: Description = None
    completed: bool | None = None
    priority: Annotated[PriorityName, LEFT_OUT_PRIORITY] = DEFAULT_PRIORITY
    tags: Annotated[Tags, LEFT_OUT_TAGS] = ()
    due_date: DueDate = None


class SetCompletion(_Body):
    completed: bool
