"""The chip profile's `docker run` flags, written as a user types them (`--shm-size=32g`, `--gpus=all`), as Docker
SDK arguments. The model card prints the flags verbatim and the evaluate stage runs the image with `run_options`
of the same list, so what we test is what users run. A flag we cannot express is a matrix error, found at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from docker.types import DeviceRequest, Ulimit


def _gpus(value: str, options: dict[str, Any]) -> None:
    count = -1 if value == "all" else int(value)
    options.setdefault("device_requests", []).append(DeviceRequest(count=count, capabilities=[["gpu"]]))


def _ulimit(value: str, options: dict[str, Any]) -> None:
    name, _, limits = value.partition("=")
    soft, _, hard = limits.partition(":")
    options.setdefault("ulimits", []).append(Ulimit(name=name, soft=int(soft), hard=int(hard or soft)))


def _env(value: str, options: dict[str, Any]) -> None:
    key, _, item = value.partition("=")
    options.setdefault("environment", {})[key] = item


def _append(key: str) -> Callable[[str, dict[str, Any]], None]:
    return lambda value, options: options.setdefault(key, []).append(value)


def _set(key: str) -> Callable[[str, dict[str, Any]], None]:
    return lambda value, options: options.__setitem__(key, value)


# `docker run` flag -> how it lands in `containers.run(**options)`; a flag not listed is a matrix error
FLAGS: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "--gpus": _gpus, "--shm-size": _set("shm_size"), "--ipc": _set("ipc_mode"), "--pid": _set("pid_mode"),
    "--net": _set("network_mode"), "--network": _set("network_mode"), "--cap-add": _append("cap_add"),
    "--device": _append("devices"), "-v": _append("volumes"), "--volume": _append("volumes"),
    "--security-opt": _append("security_opt"), "--group-add": _append("group_add"), "--ulimit": _ulimit,
    "-e": _env, "--env": _env,
}
SWITCHES = {"--privileged": "privileged", "--init": "init"}


def run_options(flags: list[str]) -> dict[str, Any]:
    """SDK arguments for the chip's `docker run` flags; ValueError names a flag it cannot express."""
    options: dict[str, Any] = {}
    for flag in flags:
        if flag in SWITCHES:
            options[SWITCHES[flag]] = True
            continue
        name, equals, value = flag.partition("=")
        if name not in FLAGS or not equals or not value:
            allowed = ", ".join(sorted([*(f"{f}=VALUE" for f in FLAGS), *SWITCHES]))
            raise ValueError(f"cannot run with {flag!r}; write flags as --name=value, one of: {allowed}")
        try:
            FLAGS[name](value, options)
        except ValueError:
            raise ValueError(f"cannot read the value of {flag!r}") from None
    return options
