"""Commands: what a user asks to change. Imperative, plain data; the actor is never in
the body (it comes from the token and travels beside the command)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from shared.tasks import DESCRIPTION_MAX, TITLE_MAX


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _title(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if len(value) > TITLE_MAX:
        raise ValueError(f"must be at most {TITLE_MAX} characters")
    _no_nul(value)
    return value


Title = Annotated[str, AfterValidator(_title)]
Description = Annotated[
    str | None, Field(max_length=DESCRIPTION_MAX), AfterValidator(_no_nul)
]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CreateTask(_Command):
    title: Title
    description: Description = None


class ChangeTask(_Command):
    """PATCH: any of the fields; a field left out is left as it is."""

    title: Title | None = Field(default=None, json_schema_extra={"nullable": False})
    description: Description = None
    completed: bool | None = Field(default=None, json_schema_extra={"nullable": False})

    @field_validator("title", "completed", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("must not be null")
        return value


class ReplaceTask(_Command):
    """PUT on the `/api/{user_id}/tasks/{id}` contract: title required, description
    replaced (null when left out), completed changed only when given."""

    title: Title
    description: Description = None
    completed: bool | None = None


class SetCompletion(_Command):
    completed: bool
