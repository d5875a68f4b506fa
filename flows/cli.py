"""`flagrelease`: the command line. Thin: parse arguments, call the domain or Prefect layer, print, pick an exit code.

Exit codes: 0 success; 1 a release or service failed; 2 bad input (unknown release, invalid matrix, bad argument).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flows.errors import BadInput, FlagReleaseError, ServiceUnavailable
from flows.services import prefect_env
from flows.settings import Settings

# Without a terminal rich would wrap at 80 columns, breaking paths and digests that scripts copy; no emoji codes
# either, or "releases.yaml:100:" loses its line number to one.
console = Console(soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, soft_wrap=True, emoji=False, width=None if sys.stderr.isatty() else 200)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.matrix:
        os.environ["FLAGRELEASE_MATRIX"] = str(Path(args.matrix).resolve())
    try:
        settings = Settings()
        (settings.state_dir / "prefect").mkdir(parents=True, exist_ok=True)
        for key, value in prefect_env(settings).items():
            os.environ.setdefault(key, value)  # before Prefect is imported; an explicit environment wins
        return args.handler(args, settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        errors.print(f"[red]error:[/red] invalid FLAGRELEASE_* setting: {where}: {first['msg']}", markup=True,
                     highlight=False)
        return 2
    except FlagReleaseError as exc:
        errors.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flagrelease", description="Release FlagOS builds of open-source LLMs on AI chips.")
    parser.add_argument("--matrix", help="release matrix file (default: releases.yaml of this checkout, or $FLAGRELEASE_MATRIX)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser("list", help="list the releases of the matrix")
    cmd.set_defaults(handler=_list)

    cmd = commands.add_parser("validate", help="validate the matrix and every chip profile it names")
    cmd.set_defaults(handler=_validate)

    cmd = commands.add_parser("plan", help="resolve one release here (no Prefect): pin inputs, print the fingerprint")
    cmd.add_argument("release")
    cmd.add_argument("--offline", action="store_true", help="do not contact hubs; revisions stay unpinned")
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    cmd.set_defaults(handler=_plan)

    cmd = commands.add_parser("prepare", help="install the engine here and fill this machine's build caches: Debian bases, image wheels")
    cmd.set_defaults(handler=_prepare)

    cmd = commands.add_parser("weights", help="fetch and verify one release's weights here, with a progress bar")
    cmd.add_argument("release")
    cmd.add_argument("--reverify", action="store_true", help="re-hash even when a verified manifest is current")
    cmd.add_argument("--offline", action="store_true", help="do not contact hubs to pin the revision")
    cmd.set_defaults(handler=_weights)

    cmd = commands.add_parser("lock", help="record locks/<model>.json from a weights folder you vouch for")
    cmd.add_argument("model", help="a model of the matrix (its `models:` key)")
    cmd.add_argument("--folder", type=Path, help="the folder to hash (default: the model's weights folder)")
    cmd.add_argument("--replace", action="store_true", help="record it again over an existing lock")
    cmd.set_defaults(handler=_lock)

    cmd = commands.add_parser("run", help="run a release through its Prefect deployment, showing its stages as they go")
    cmd.add_argument("release")
    cmd.add_argument("--timeout", type=int, default=3600, help="seconds to wait for the run (default 3600)")
    cmd.add_argument("--quiet", action="store_true", help="print only the final summary, not the run as it happens")
    cmd.set_defaults(handler=_run)

    cmd = commands.add_parser("serve", help="serve every deployment from this process (foreground)")
    cmd.add_argument("--limit", type=int, default=None, help="maximum concurrent flow runs")
    cmd.set_defaults(handler=_serve)

    cmd = commands.add_parser("deploy", help="production style: create one work pool per chip and apply prefect.yaml")
    cmd.add_argument("--pool", help="register only this work pool's deployments, from this checkout (a chip host "
                                    "whose checkout is at its own path)")
    cmd.set_defaults(handler=_deploy)

    cmd = commands.add_parser("deployments", help="prefect.yaml generated from the matrix")
    cmd.add_argument("action", choices=["render", "check"], help="render: print it; check: compare with the committed file")
    cmd.set_defaults(handler=_deployments)

    cmd = commands.add_parser("services", help="start, stop or inspect the local services")
    cmd.add_argument("action", choices=["up", "down", "status"])
    cmd.add_argument("names", nargs="*", help="docker, registry, prefect, deployments (default: all)")
    cmd.set_defaults(handler=_services)
    return parser


def _matrix(settings: Settings):
    from flows.matrix import load_matrix

    return load_matrix(settings.matrix, settings.images_dir)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    matrix = _matrix(settings)
    table = Table(title=f"releases in {settings.matrix}")
    for column in ("release", "chip", "model", "schedule", "suite", "reference", "repository"):
        table.add_column(column)
    for name, rel in matrix.spec.releases.items():
        table.add_row(name, rel.chip, rel.model, f"{rel.schedule.cron} {rel.schedule.timezone}", rel.suite, rel.reference, rel.repository)
    console.print(table)
    return 0


def _validate(args: argparse.Namespace, settings: Settings) -> int:
    matrix = _matrix(settings)
    console.print(f"{settings.matrix}: valid ({len(matrix.spec.releases)} releases, {len(matrix.chips)} chips, "
                  f"{len(matrix.spec.models)} models, {len(matrix.spec.suites)} suites)")
    return 0


def _plan(args: argparse.Namespace, settings: Settings) -> int:
    from flows.plan import resolve, write_plan

    if args.offline:
        settings = settings.model_copy(update={"offline": True})
    plan = resolve(_matrix(settings), args.release, settings)
    path = write_plan(plan, settings.release_dir(plan.release, plan.fingerprint))
    if args.json:
        print(plan.model_dump_json(indent=2))
        return 0
    revision = plan.revision.resolved if plan.revision.pinned else f"unpinned ({plan.revision.note})"
    console.print(f"release      {plan.release}\nchip         {plan.chip.name}\nmodel        {plan.model.display_name}\n"
                  f"revision     {revision}\nfingerprint  {plan.fingerprint}\nplan         {path}", highlight=False)
    return 0


def _prepare(args: argparse.Namespace, settings: Settings) -> int:
    """The Debian bases and the engine's wheels come from different servers: fetched at once, each step timed."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from flows.build.base import base_tarball
    from flows.build.wheels import engine_environment

    def log(message: str) -> None:
        console.print(f"prepare: {message}", highlight=False)

    def timed(what: str, make) -> None:
        started = time.monotonic()
        made = make()
        log(f"{what}: {made} ({time.monotonic() - started:.0f} s)")

    steps = [(f"{chip.name} base", lambda recipe=chip.base_debootstrap: base_tarball(recipe, log))
             for chip in _matrix(settings).chips.values() if chip.base_debootstrap is not None]
    steps.append(("engine environment (the cpu image's wheels)", lambda: engine_environment(settings.project_dir, log)))
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        for done in [pool.submit(timed, what, make) for what, make in steps]:
            done.result()
    return 0


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from flows.revisions import resolve_revision
    from flows.weights.manifest import manifest_path, prepare_weights

    matrix = _matrix(settings)
    release = matrix.release(args.release)
    model = matrix.spec.models[release.model]
    if model.source.hub == "derived":
        raise BadInput(f"the weights of {args.release} ({release.model}) are made by its release image from "
                       f"{model.source.repo}'s: `flagrelease run {args.release}` makes and verifies them")
    revision = resolve_revision(model.source, offline=args.offline or settings.offline, timeout_s=settings.hub_timeout_s,
                                pypi_index=settings.pypi_index)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console) as bar:
        def progress(total: int):
            task = bar.add_task("sha256", total=total)
            return lambda count: bar.advance(task, count)

        manifest, hashed = prepare_weights(release.model, model, revision, settings.weights_dir, settings.project_dir,
                                           settings.state_dir, args.reverify,
                                           lambda line: console.print(line, highlight=False), progress)
    record = manifest_path(settings.state_dir, release.model, Path(manifest.folder))
    console.print(f"verified {len(manifest.files)} files ({manifest.total_bytes / 2**20:,.1f} MiB, "
                  f"{manifest.total_params:,} parameters, {manifest.dtype}) against {manifest.expected_from}; "
                  f"{hashed / 2**20:,.1f} MiB hashed now\nmanifest  {record}", highlight=False)
    return 0


def _lock(args: argparse.Namespace, settings: Settings) -> int:
    from flows.plan import derived_from
    from flows.revisions import resolve_revision
    from flows.weights.checkpoint import verify_structure
    from flows.weights.expected import record_lock
    from flows.weights.sources import weights_folder

    matrix = _matrix(settings)
    if args.model not in matrix.spec.models:
        raise BadInput(f"unknown model {args.model!r}; the matrix has: {', '.join(sorted(matrix.spec.models))}")
    model = matrix.spec.models[args.model]
    base = derived_from(matrix, model)  # a derived model's folder is named by its base's revision
    revision = resolve_revision((base.model if base else model).source, offline=True, timeout_s=settings.hub_timeout_s,
                                pypi_index=settings.pypi_index)
    folder = args.folder or weights_folder(settings.weights_dir, args.model, model, revision)
    path, count = record_lock(args.model, f"{model.source.hub}:{model.source.repo}", folder, settings.project_dir,
                              args.replace, lambda where: verify_structure(where, model))
    console.print(f"recorded {count} files of {folder} in {path}: commit it, it is part of the fingerprint",
                  highlight=False)
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from flows.services import Services

    _matrix(settings).release(args.release)  # unknown release: exit 2 before touching Prefect
    if not Services(settings).spec("prefect").healthy():
        raise ServiceUnavailable("Prefect server", f"nothing answers at {settings.prefect_api_url}", "flagrelease services up")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from flows.progress import follow_run

    try:
        run = run_deployment(f"release/{args.release}", timeout=0)  # returns once created; followed below
    except ObjectNotFound:
        raise ServiceUnavailable("deployment release/" + args.release, "it is not registered with the Prefect server",
                                 "flagrelease services up deployments") from None
    url = f"{settings.prefect_ui_url}/runs/flow-run/{run.id}"
    if not args.quiet:
        console.print(f"release/{args.release}: flow run {url}", highlight=False)
    run = follow_run(run.id, args.timeout, None if args.quiet else console)
    state = run.state.name if run.state else "unknown"
    outputs = sorted((settings.releases_dir / args.release).glob("*/plan.json"), key=lambda p: p.stat().st_mtime)
    console.print(f"release/{args.release}: {state}\nflow run   {url}\nPrefect UI {settings.prefect_ui_url}", highlight=False)
    if outputs:
        folder = outputs[-1].parent
        record = folder / "release.json"
        if record.exists():
            published = json.loads(record.read_text())
            console.print(f"image      {published['repository']}@{published['image_digest']}\n"
                          f"card       {folder / 'README.md'}", highlight=False)
        console.print(f"outputs    {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})", highlight=False)
    return 0 if run.state is not None and run.state.is_completed() else 1


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(_matrix(settings), limit=args.limit)
    return 0


def _deploy(args: argparse.Namespace, settings: Settings) -> int:
    from flows.deployments import apply_prefect_yaml, work_pools

    matrix = _matrix(settings)
    _check_prefect_yaml(settings)
    try:
        apply_prefect_yaml(matrix, str(settings.project_dir), dict(os.environ), args.pool)
    except subprocess.CalledProcessError as exc:
        raise FlagReleaseError(f"`{' '.join(exc.cmd)}` failed:\n{(exc.stderr or exc.stdout or '').strip()[-2000:]}") from None
    console.print(f"work pools: {', '.join(work_pools(matrix))}\nstart a worker on each chip host with: "
                  f"prefect worker start --pool <pool>", highlight=False)
    return 0


def _deployments(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "render":
        print(_rendered_prefect_yaml(settings), end="")
        return 0
    _check_prefect_yaml(settings)
    console.print("prefect.yaml matches the matrix")
    return 0


def _rendered_prefect_yaml(settings: Settings) -> str:
    import prefect

    from flows.deployments import render_prefect_yaml

    return render_prefect_yaml(_matrix(settings), prefect.__version__)


def _check_prefect_yaml(settings: Settings) -> None:
    committed = settings.project_dir / "prefect.yaml"
    if not committed.exists() or committed.read_text() != _rendered_prefect_yaml(settings):
        raise BadInput(f"{committed} is out of date with {settings.matrix}; regenerate it with: "
                       "flagrelease deployments render > prefect.yaml")


def _services(args: argparse.Namespace, settings: Settings) -> int:
    from flows.deployments import deployment_specs
    from flows.services import Services

    names = tuple(args.names) or Services.ORDER
    expected = [f"{spec.flow}/{spec.name}" for spec in deployment_specs(_matrix(settings))] if "deployments" in names else []
    services = Services(settings, expected_deployments=expected)
    action = {"up": services.up, "down": services.down, "status": services.status}[args.action]
    statuses = action(names)
    table = Table()
    for column in ("service", "state", "detail"):
        table.add_column(column)
    for status in statuses:
        table.add_row(status.name, status.state, status.detail)
    console.print(table)
    if args.action == "up":
        console.print(f"Prefect UI: {settings.prefect_ui_url}", highlight=False)
    return 0 if args.action != "status" or all(s.state.startswith("running") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
