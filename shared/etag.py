"""ETags name a task's version; If-Match compares against it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r'^(?:W/)?"v([0-9]{1,18})"$')


def etag(version: int) -> str:
    return f'"v{version}"'


@dataclass(frozen=True)
class IfMatch:
    """The versions an If-Match header accepts; ``any`` for ``*``. A header naming no
    version of ours accepts none, so it always fails (412); ``empty``: it names nothing
    at all (`If-Match:` with no value, or only commas), which the command API refuses
    as malformed (an unset ETag variable, most likely) rather than as a conflict."""

    versions: frozenset[int] = frozenset()
    any: bool = False
    empty: bool = False

    def accepts(self, version: int) -> bool:
        return self.any or version in self.versions

    @classmethod
    def parse(cls, header: str | None) -> IfMatch | None:
        if header is None:
            return None
        versions = set()
        named = False
        for part in header.split(","):
            part = part.strip()
            if part == "*":
                return cls(any=True)
            named = named or bool(part)
            match = _TAG.match(part)
            if match:
                versions.add(int(match.group(1)))
        return cls(frozenset(versions), empty=not named)
