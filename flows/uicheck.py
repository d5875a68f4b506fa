"""Look at the Prefect UI the way a person does: headless Chromium renders a page, we keep a screenshot and check
that the rendered page shows what it should (e.g. every release deployment).

    python -m flows.uicheck http://127.0.0.1:4200/deployments --screenshot ui.png --expect qwen3-iluvatar smollm2-cpu
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


@dataclass(frozen=True)
class PageCheck:
    url: str
    screenshot: Path
    missing: list[str]
    dom_bytes: int


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def check_page(url: str, screenshot: Path, expect: list[str], budget_ms: int = 20000) -> PageCheck:
    """Render `url` (the SPA gets `budget_ms` of virtual time to fetch and draw), screenshot it, find `expect`."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium is not installed: bash scripts/setup.sh --for-tests")
    with tempfile.TemporaryDirectory(prefix="flagrelease-chromium-") as profile:
        common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1600,1000",
                  f"--virtual-time-budget={budget_ms}"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    return PageCheck(url=url, screenshot=screenshot, missing=[e for e in expect if e not in dom], dom_bytes=len(dom))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--screenshot", type=Path, default=Path("prefect-ui.png"))
    parser.add_argument("--expect", nargs="*", default=[], help="texts the rendered page must contain")
    args = parser.parse_args(argv)
    result = check_page(args.url, args.screenshot, args.expect)
    print(f"{result.url}: rendered {result.dom_bytes} bytes of DOM, screenshot {result.screenshot}")
    if result.missing:
        print(f"missing from the page: {', '.join(result.missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
