"""Domain errors: one type per failure family, each carrying what a release engineer needs to act.

The CLI turns `BadInput` subclasses into exit code 2 and `ReleaseFailed` subclasses into exit code 1,
always as a one-paragraph message, never a traceback.
"""

from __future__ import annotations


class FlagReleaseError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code = 1


class BadInput(FlagReleaseError):
    """The user asked for something that cannot be done as written (a file, field or argument is wrong)."""

    exit_code = 2


class MatrixError(BadInput):
    """The release matrix or a chip profile is invalid. Each problem names the file, line and field path."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{listing}")


class UnknownRelease(BadInput):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"unknown release {name!r}; known releases: {', '.join(sorted(known))}")


class ServiceUnavailable(FlagReleaseError):
    """A service the pipeline needs (Docker Engine, registry, Prefect server) is not answering."""

    def __init__(self, service: str, detail: str, start_hint: str):
        self.service = service
        super().__init__(f"{service} is not available: {detail}. Start it with: {start_hint}")
