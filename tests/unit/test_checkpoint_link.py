"""The link an engine start points at the served checkpoint must resolve wherever the cache is mounted: the image
mounts it at /var/cache/flagos, tests and chip hosts without Docker use it at its host path, and the benchmark
client of the image reads a link that an engine on the host may have made."""

from __future__ import annotations

import os
from pathlib import Path

from engine.checkpoint import point_at


def test_the_served_link_resolves_after_the_cache_is_mounted_elsewhere(tmp_path: Path):
    host_cache = tmp_path / "host" / "engine"
    folder = host_cache / "checkpoints" / "model-0123"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    point_at(host_cache / "serving" / "model", folder)
    point_at(host_cache / "serving" / "model", folder)  # a second start replaces it in place

    mounted = tmp_path / "container" / "var" / "cache" / "flagos"
    mounted.parent.mkdir(parents=True)
    host_cache.rename(mounted)  # the same folder seen at another path
    link = mounted / "serving" / "model"
    assert (link / "config.json").read_text() == "{}"
    assert link.resolve() == (mounted / "checkpoints" / "model-0123").resolve()
    assert sorted(p.name for p in (mounted / "serving").iterdir()) == ["model"]  # no staging link left behind
    assert not os.path.isabs(os.readlink(link))
