"""`flagrelease run` as it happens, read back from the Prefect API while the flow run goes on.

What is shown is what the run itself recorded, never recomputed: each stage's start and end (with its duration)
from the task-run states, and from the run's log (the lines the UI shows) the build step, the weights' MiB/s and
ETA, the evaluation's items/s and verdicts. `Timeline` turns records into lines and does no I/O, so it is tested
on records built by hand; `follow_run` polls the API and shows the lines with Rich.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from uuid import UUID

from rich.console import Console
from rich.text import Text

from flows.build.image import STEP

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun, Log, TaskRun

POLL_S = 2.0
LOG_PAGE = 200  # the most records the server returns at once
LATE_S = 10.0  # log records reach the server in batches, not always in order: each poll reads this far back again

LASTING = re.compile(r"^(pushed |published |weights verified: |every gated benchmark passed|Task run failed with )"
                     r"| is already in the registry as ")
STACK_PROGRESS = re.compile(r"^\S+: \w+ stack (\d+)/(\d+) items, ")
VERDICT = re.compile(r" -> (PASS|FAIL|INCONCLUSIVE|DIFFERS)\b")
VERDICT_TONE = {"PASS": "ok", "FAIL": "fail", "INCONCLUSIVE": "warn", "DIFFERS": "warn"}
STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", None: ""}
FAILED_PREFIX = "Task run encountered an exception "  # Prefect's words before the exception in a Failed state


@dataclass(frozen=True)
class Update:
    """One thing to show: a line that stays (`lasting`), or the running stage's progress, which the next replaces."""

    at: datetime
    text: str
    lasting: bool = False
    tone: str | None = None  # "ok", "warn" or "fail"
    ends_stage: bool = False  # what follows a stage's end waits for that stage's late log lines


def stage_name(run: TaskRun) -> str:
    """The task's name: Prefect names a task run `<task>-<key>` (`find-image-0`)."""
    return run.name.rpartition("-")[0] or run.name


def duration(span: timedelta) -> str:
    seconds = span.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def stage_updates(task_runs: Sequence[TaskRun], shown: set[tuple]) -> list[Update]:
    """Each stage's start (again on a retry) and end, each said once: `shown` keeps what was said and is updated."""
    updates = []
    for run in task_runs:
        state, stage = run.state, stage_name(run)
        if state is None or run.start_time is None or not (state.is_running() or state.is_final()):
            continue
        if ("start", run.id, run.run_count) not in shown:
            shown.add(("start", run.id, run.run_count))
            again = run.run_count > 1
            updates.append(Update(state.timestamp if again else run.start_time,
                                  f"{stage} started again (attempt {run.run_count})" if again else f"{stage} started",
                                  lasting=True))
        if not state.is_final() or ("end", run.id) in shown:
            continue
        shown.add(("end", run.id))
        took, at = duration(run.total_run_time), run.end_time or state.timestamp
        if state.is_completed():
            updates.append(Update(at, f"{stage} completed in {took}", lasting=True, tone="ok", ends_stage=True))
        else:
            reason = (state.message or state.name).removeprefix(FAILED_PREFIX).strip()
            updates.append(Update(at, f"{stage} {state.type.value.lower()} after {took}: {reason}", lasting=True,
                                  tone="fail", ends_stage=True))
    return updates


def log_update(record: Log, stage: str | None) -> Update | None:
    """What one log record shows, if anything. Errors are left to the failed state (which carries the reason without
    the traceback); the runner's and the engines' own lines are left to the UI; inside build only the step."""
    lines = record.message.strip().splitlines()
    if record.level >= logging.ERROR or not lines or lines[0].startswith("Finished in state"):
        return None
    line, at = lines[0], record.timestamp
    if record.level >= logging.WARNING:
        return Update(at, f"{stage}: warning: {line}" if stage else f"warning: {line}", lasting=True, tone="warn")
    if stage is None:
        return None
    if LASTING.search(line):
        return Update(at, f"{stage}: {line}", lasting=True, tone="warn" if line.startswith("Task run") else None)
    if stage == "build":
        step = STEP.match(line)
        return Update(at, f"build: step {step.group(1)}: {step.group(2)}") if step else None
    verdict = VERDICT.search(line)
    if verdict:
        return Update(at, f"{stage}: {line}", lasting=True, tone=VERDICT_TONE[verdict.group(1)])
    counted = STACK_PROGRESS.match(line)
    return Update(at, f"{stage}: {line}", lasting=bool(counted) and counted.group(1) == counted.group(2))


@dataclass
class Timeline:
    """What the polls read, shown once and in the order it happened (states and log lines share the worker's
    clock). A stage's end, and all after it, waits one poll: its last log lines reach the server in batches, after
    its state."""

    shown: set[tuple] = field(default_factory=set)
    held: list[Update] = field(default_factory=list)

    def poll(self, task_runs: Sequence[TaskRun], records: Sequence[Log], flush: bool = False) -> list[Update]:
        stages = {run.id: stage_name(run) for run in task_runs}
        said = [log_update(record, stages.get(record.task_run_id)) for record in records]
        new = stage_updates(task_runs, self.shown) + [update for update in said if update]
        pending = sorted(self.held + new, key=lambda update: update.at)
        ends = [update.at for update in new if update.ends_stage]
        if flush or not ends:
            self.held = []
            return pending
        self.held = [update for update in pending if update.at >= min(ends)]
        return [update for update in pending if update.at < min(ends)]


def render(update: Update) -> Text:
    """A Text, not markup: log lines carry brackets ("pip install flagscale[serve]") that markup would eat."""
    return Text(update.text, style=STYLE[update.tone])


@contextmanager
def display(console: Console) -> Iterator[Callable[[Update], None]]:
    """On a terminal, lasting lines print above a status line that shows the latest update; elsewhere (a pipe, a
    file) every update is a line of its own."""
    if not console.is_terminal:
        yield lambda update: console.print(render(update))
        return
    with console.status("") as status:
        def show(update: Update) -> None:
            line = render(update)
            if update.lasting:
                console.print(line)
            line = line.copy()
            line.truncate(console.width - 3, overflow="ellipsis")  # one line beside the spinner, or Live loses count
            status.update(line)

        yield show


@dataclass
class RunLog:
    """The flow run's log records, each returned once however often it is read."""

    flow_run_id: UUID
    seen: set[UUID] = field(default_factory=set)
    newest: datetime | None = None

    def new(self, client: SyncPrefectClient) -> list[Log]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
        from prefect.client.schemas.sorting import LogSort

        after = self.newest - timedelta(seconds=LATE_S) if self.newest else None
        which = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]),
                          timestamp=LogFilterTimestamp(after_=after))
        fresh, offset = [], 0
        while True:
            page = client.read_logs(which, limit=LOG_PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            fresh += [record for record in page if record.id not in self.seen]
            self.seen.update(record.id for record in page)
            if page:
                self.newest = page[-1].timestamp  # pages come oldest first
            if len(page) < LOG_PAGE:
                return fresh
            offset += len(page)


def follow_run(flow_run_id: UUID, timeout_s: float, console: Console | None = None) -> FlowRun:
    """Poll the flow run until its state is final or `timeout_s` passes; with a console, show what it does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + timeout_s
    log, timeline, state = RunLog(flow_run_id), Timeline(), None
    tasks = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client, ExitStack() as stack:
        show = stack.enter_context(display(console)) if console else None
        while True:
            run = client.read_flow_run(flow_run_id)
            done = (run.state is not None and run.state.is_final()) or time.monotonic() >= deadline
            if show:
                if not done and run.state and run.state.name != state:  # Scheduled, Late (no worker took it), ...
                    state = run.state.name
                    show(Update(datetime.now(timezone.utc), f"flow run {run.name}: {state}"))
                if done:
                    time.sleep(POLL_S)  # the run's last log lines are still on their way
                records = log.new(client)  # before the task runs: every record's task run is then among them
                task_runs = client.read_task_runs(task_run_filter=tasks, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
                for update in timeline.poll(task_runs, records, flush=done):
                    show(update)
            if done:
                return run
            time.sleep(POLL_S)
