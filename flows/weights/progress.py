"""Progress for long byte-counting work: periodic log lines (for the Prefect run log) or a rich bar (for the CLI)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def periodic_progress(total: int, log: Callable[[str], None], every_s: float = 5.0) -> Callable[[int], None]:
    """A callback that logs `done/total, MiB/s, ETA` at most every `every_s` seconds (thread-safe)."""
    lock, state = threading.Lock(), {"done": 0, "start": time.monotonic(), "last": time.monotonic()}

    def advance(count: int) -> None:
        with lock:
            state["done"] += count
            now = time.monotonic()
            if now - state["last"] < every_s and state["done"] < total:
                return
            state["last"] = now
            rate = state["done"] / max(now - state["start"], 1e-9)
            eta = (total - state["done"]) / rate if rate else float("inf")
            log(f"hashed {state['done'] / 2**20:,.0f} of {total / 2**20:,.0f} MiB "
                f"({100 * state['done'] / max(total, 1):.0f}%), {rate / 2**20:,.0f} MiB/s, ETA {eta:,.0f} s")

    return advance
