"""The chip's `docker run` flags as Docker SDK arguments: every flag the profiles use, and a clear refusal of the rest."""

from __future__ import annotations

import pytest

from flows.errors import MatrixError
from flows.matrix import load_matrix
from flows.runflags import run_options
from tests.conftest import PROJECT_DIR


def test_every_chip_profile_flag_becomes_an_sdk_argument():
    chips = load_matrix(PROJECT_DIR / "releases.yaml").chips
    assert run_options(chips["cpu"].docker_run_flags) == {"shm_size": "1g"}
    nvidia = run_options(chips["nvidia"].docker_run_flags)
    assert nvidia["ipc_mode"] == "host" and nvidia["shm_size"] == "32g"
    [gpus] = nvidia["device_requests"]
    assert gpus["Count"] == -1 and gpus["Capabilities"] == [["gpu"]]
    iluvatar = run_options(chips["iluvatar"].docker_run_flags)
    assert iluvatar["privileged"] is True and iluvatar["network_mode"] == "host" and iluvatar["cap_add"] == ["ALL"]
    assert iluvatar["volumes"] == ["/dev:/dev", "/usr/src:/usr/src", "/lib/modules:/lib/modules"]


def test_repeated_and_valued_flags():
    options = run_options(["--device=/dev/a", "--device=/dev/b", "--ulimit=memlock=-1:-1", "-e=A=1=2", "--gpus=2"])
    assert options["devices"] == ["/dev/a", "/dev/b"]
    assert options["environment"] == {"A": "1=2"}
    assert options["ulimits"][0]["Name"] == "memlock" and options["ulimits"][0]["Soft"] == -1
    assert options["device_requests"][0]["Count"] == 2


@pytest.mark.parametrize("flag, message", [
    ("--rm", "cannot run with '--rm'; write flags as --name=value, one of: "),
    ("--shm-size", "cannot run with '--shm-size'"),
    ("--gpus=some", "cannot read the value of '--gpus=some'"),
    ("--ulimit=nofile=x", "cannot read the value of"),
])
def test_a_flag_that_cannot_be_expressed_is_named(flag: str, message: str):
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        run_options([flag])


def test_the_matrix_rejects_a_chip_with_an_unusable_flag(project_copy):
    profile = project_copy / "images" / "cpu" / "chip.yaml"
    profile.write_text(profile.read_text().replace("  - --shm-size=1g", "  - --detach-keys=ctrl-x"))
    with pytest.raises(MatrixError, match="docker_run_flags: .*cannot run with '--detach-keys=ctrl-x'"):
        load_matrix(project_copy / "releases.yaml")
