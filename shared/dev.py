"""The one-origin development app behind `taskctl dev`."""

from __future__ import annotations

from fastapi import FastAPI

from shared.settings import Settings


def create_dev_app(settings: Settings) -> FastAPI:
    from command_api.app import create_app  # noqa: PLC0415 - composition root

    return create_app(settings)
