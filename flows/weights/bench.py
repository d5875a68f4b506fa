"""Hashing benchmark: verify ~4 GB over 8 files (in page cache) three ways, in one run, and print the ratios.

    python -m flows.weights.bench [--gib 4] [--files 8]

Baselines: `sha256sum` one file after another, and a single-threaded `hashlib.sha256` loop; ours is
`flows.weights.hashing.sha256_files` (one thread per file on all cores). Goal: >= 1.8x the hashlib loop on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.weights.hashing import BLOCK, sha256_files


def _hashlib_loop(paths: list[Path]) -> dict[Path, str]:
    digests = {}
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb", buffering=0) as handle:
            while block := handle.read(BLOCK):
                digest.update(block)
        digests[path] = digest.hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args(argv)
    per_file = int(args.gib * 2**30 / args.files)
    with tempfile.TemporaryDirectory(prefix="flagrelease-hash-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as folder:
        paths = []
        chunk = os.urandom(64 * 2**20)
        for index in range(args.files):
            path = Path(folder) / f"shard-{index:02d}.bin"
            with path.open("wb") as handle:
                for _ in range(per_file // len(chunk)):
                    handle.write(chunk)
                handle.write(os.urandom(per_file % len(chunk) + index))  # every file differs
            paths.append(path)
        total = sum(p.stat().st_size for p in paths)
        _hashlib_loop(paths)  # warm the page cache
        timings = {}
        start = time.perf_counter()
        out = subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, text=True, check=True).stdout
        timings["sha256sum, one file after another"] = time.perf_counter() - start
        start = time.perf_counter()
        reference = _hashlib_loop(paths)
        timings["hashlib.sha256, single thread"] = time.perf_counter() - start
        start = time.perf_counter()
        ours, read = sha256_files(paths)
        timings[f"sha256_files, {os.cpu_count()} threads"] = time.perf_counter() - start
        assert ours == reference and all(line.split()[0] == reference[Path(line.split()[1])] for line in out.splitlines())
        assert read == total
    print(f"{len(paths)} files, {total / 2**30:.2f} GiB in page cache, {os.cpu_count()} cores\n")
    print("| method | seconds | s/GiB | speed-up vs hashlib loop |\n|---|---|---|---|")
    base = timings["hashlib.sha256, single thread"]
    for label, seconds in timings.items():
        print(f"| {label} | {seconds:.2f} | {seconds / (total / 2**30):.2f} | {base / seconds:.2f}x |")
    print(f"\nbytes read by sha256_files: {read:,} = {read / total:.2f}x the data (each byte once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
