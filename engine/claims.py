"""Fail the image build when the image does not hold the tool versions its chip profile claims: the card prints
those versions, so a claim the image does not bear out must stop the build, not reach a user.

    python3 -m engine.claims claims.json     (run by the Dockerfile, in $FLAGOS_HOME)
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTIONS = {"flaggems": "flag_gems", "flagscale": "flag-scale"}  # tool name in chip.yaml -> its Python distribution, where they differ


def installed(tool: str) -> str:
    try:
        return version(DISTRIBUTIONS.get(tool, tool))
    except PackageNotFoundError:
        return "not installed"


def unmet(claims: dict[str, str]) -> list[str]:
    """Each claim the environment does not hold; a local build label (2.13.0+cpu) holds its release (2.13.0)."""
    return [f"{tool} {claimed} claimed, {found} found" for tool, claimed in sorted(claims.items())
            if (found := installed(tool)) != claimed and not found.startswith(f"{claimed}+")]


def main(argv: list[str]) -> int:
    claims = json.loads(Path(argv[0]).read_text())
    wrong = unmet(claims)
    if wrong:
        print("this image does not hold what images/<chip>/chip.yaml `versions` claims: " + "; ".join(wrong),
              file=sys.stderr)
        return 1
    print("versions claimed and held: " + ", ".join(f"{t} {v}" for t, v in sorted(claims.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
