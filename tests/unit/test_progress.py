"""What `flagrelease run` shows, from task-run states and log records built here as the Prefect API returns them."""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

from prefect.client.schemas.objects import Log, State, StateType, TaskRun
from rich.console import Console

import flows.evaluate.client
from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack
from flows.progress import Timeline, Update, display, duration, log_update, stage_updates
from flows.weights.progress import periodic_progress
from tests.conftest import PROJECT_DIR, free_port

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
FLOW_RUN = uuid4()


def task_run(name: str, kind: StateType, *, seconds: float = 0.0, run_count: int = 1, state_name: str | None = None,
             message: str | None = None, run_id: UUID | None = None) -> TaskRun:
    """A task run of the release's flow run as read back: started at T0, its state `seconds` later."""
    at = T0 + timedelta(seconds=seconds)
    final = kind in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)
    return TaskRun(id=run_id or uuid4(), name=name, task_key=f"{name}-key", dynamic_key="0", flow_run_id=FLOW_RUN,
                   run_count=run_count, start_time=T0, end_time=at if final else None,
                   total_run_time=timedelta(seconds=seconds),
                   state=State(type=kind, name=state_name or kind.value.title(), message=message, timestamp=at))


def record(message: str, seconds: float = 1.0, run: TaskRun | None = None, level: int = logging.INFO) -> Log:
    return Log(name="prefect.task_runs", level=level, message=message, timestamp=T0 + timedelta(seconds=seconds),
               flow_run_id=FLOW_RUN, task_run_id=run.id if run else None)


def texts(said: list[Update]) -> list[str]:
    return [u.text for u in said]


def test_a_stage_is_said_when_it_starts_and_once_when_it_ends_with_its_duration():
    shown: set[tuple] = set()
    resolve = uuid4()
    assert texts(stage_updates([task_run("resolve-0", StateType.RUNNING, run_id=resolve)], shown)) == ["resolve started"]
    finished = [task_run("resolve-0", StateType.COMPLETED, seconds=125, run_id=resolve)]
    ended = stage_updates(finished, shown)
    assert texts(ended) == ["resolve completed in 2m 05s"] and ended[0].lasting and ended[0].tone == "ok"
    assert stage_updates(finished, shown) == []


def test_a_stage_first_seen_finished_still_starts_then_ends():
    said = stage_updates([task_run("find-image-0", StateType.COMPLETED, seconds=0.84)], set())
    assert texts(said) == ["find-image started", "find-image completed in 0.8 s"]


def test_a_failed_stage_says_why_and_where_the_report_is():
    reason = ("EvaluationFailed: smollm2-cpu is not published: arithmetic: FAIL (FlagOS is worse by 4.10 pp) "
              "(report: /state/releases/smollm2-cpu/abc/evaluation.json)")
    run = task_run("evaluate-0", StateType.FAILED, seconds=182, message=f"Task run encountered an exception {reason}")
    said = stage_updates([run], set())[-1]
    assert said.text == f"evaluate failed after 3m 02s: {reason}" and said.tone == "fail"


def test_a_retry_is_said_with_its_reason():
    shown: set[tuple] = set()
    build = uuid4()
    stage_updates([task_run("build-0", StateType.RUNNING, run_id=build)], shown)
    waiting = task_run("build-0", StateType.SCHEDULED, seconds=30, state_name="AwaitingRetry", run_id=build)
    assert stage_updates([waiting], shown) == []
    again = task_run("build-0", StateType.RUNNING, seconds=40, state_name="Retrying", run_count=2, run_id=build)
    assert texts(stage_updates([again], shown)) == ["build started again (attempt 2)"]
    why = log_update(record("Task run failed with exception: PushFailed('push broke') - Retry 1/1 will start 10 "
                            "second(s) from now", run=again), "build")
    assert why.lasting and why.tone == "warn" and why.text.startswith("build: Task run failed with exception: PushFailed")


def test_build_shows_the_step_it_is_on_not_the_step_output():
    build = task_run("build-0", StateType.RUNNING)
    lines = ["build context for r/m:abc rendered in /tmp/context", "Step 3/12 : RUN pip install --no-index wheels/*",
             " ---> Running in 0f3c", "Collecting torch", "Pushed 5f70bf18a086",
             "pushed r/m:abc = r/m@sha256:1234 (image sha256:abcd)"]
    said = Timeline().poll([build], [record(line, seconds=2 + i, run=build) for i, line in enumerate(lines)])[1:]
    assert [(u.text, u.lasting) for u in said] == [("build: step 3/12: RUN pip install --no-index wheels/*", False),
                                                   ("build: pushed r/m:abc = r/m@sha256:1234 (image sha256:abcd)", True)]


def test_weights_show_the_rate_and_eta_the_stage_logs():
    lines: list[str] = []
    advance = periodic_progress(3 * 2**30, lines.append, every_s=0.0)
    advance(2**30)
    weights = task_run("weights-0", StateType.RUNNING)
    said = log_update(record(lines[-1], run=weights), "weights")
    assert not said.lasting and said.text.startswith("weights: hashed 1,024 of 3,072 MiB (33%), ")
    assert " MiB/s, ETA " in said.text


def test_evaluate_shows_items_per_second_per_stack_then_the_verdict():
    evaluate = task_run("evaluate-0", StateType.RUNNING)
    going = log_update(record("arithmetic: flagos stack 120/200 items, 1.3 items/s", run=evaluate), "evaluate")
    done = log_update(record("arithmetic: flagos stack 200/200 items, 1.4 items/s", run=evaluate), "evaluate")
    assert going.text == "evaluate: arithmetic: flagos stack 120/200 items, 1.3 items/s" and not going.lasting
    assert done.lasting
    gate = ("arithmetic: native 0.520, FlagOS 0.470; drop (native minus FlagOS) +5.00 pp, interval [+1.20, +8.80], "
            "margin +/-3.0 pp, detectable 2.1 pp -> {} (200 items x 1)")
    failed = log_update(record(gate.format("FAIL"), run=evaluate), "evaluate")
    passed = log_update(record(gate.format("PASS"), run=evaluate), "evaluate")
    assert failed.lasting and failed.tone == "fail" and passed.tone == "ok"
    assert failed.text == "evaluate: " + gate.format("FAIL")


def test_errors_and_the_engines_own_lines_are_left_to_the_state_and_the_ui():
    evaluate = task_run("evaluate-0", StateType.RUNNING)
    assert log_update(record("Task run failed with exception: EvaluationFailed('x') - Retries are exhausted\n"
                             "Traceback (most recent call last):", run=evaluate, level=logging.ERROR), "evaluate") is None
    assert log_update(record("Finished in state Completed()", run=evaluate), "evaluate") is None
    assert log_update(record("Beginning flow run 'smollm2-cpu' for flow 'release'"), None) is None
    unpinned = log_update(record("model revision main is unpinned: offline", level=logging.WARNING,
                                 run=evaluate), "resolve")
    assert unpinned.text == "resolve: warning: model revision main is unpinned: offline" and unpinned.lasting


def test_a_poll_is_shown_in_the_order_it_happened():
    weights = task_run("weights-0", StateType.COMPLETED, seconds=5)
    records = [record("weights verified: 3 files, 256.0 MiB", seconds=4, run=weights),
               record("downloading model.safetensors (256.0 MiB)", seconds=1, run=weights),
               record("a line of a task run this flow run does not have", seconds=2, run=task_run("x-0", StateType.RUNNING))]
    said = Timeline().poll([weights], records, flush=True)
    assert texts(said) == ["weights started", "weights: downloading model.safetensors (256.0 MiB)",
                           "weights: weights verified: 3 files, 256.0 MiB", "weights completed in 5.0 s"]


def test_a_stage_end_and_what_follows_wait_one_poll_for_the_stage_late_log_lines():
    timeline, resolve = Timeline(), uuid4()
    timeline.poll([task_run("resolve-0", StateType.RUNNING, run_id=resolve)], [])
    runs = [task_run("resolve-0", StateType.COMPLETED, seconds=3, run_id=resolve),
            task_run("find-image-0", StateType.RUNNING, seconds=4)]
    runs[1] = runs[1].model_copy(update={"start_time": T0 + timedelta(seconds=4)})
    first = timeline.poll(runs, [record("fingerprint abc over 12 inputs", seconds=1, run=runs[0])])
    assert texts(first) == ["resolve: fingerprint abc over 12 inputs"]
    late = record("plan written", seconds=2.5, run=runs[0])  # logged before the end, read after it
    assert texts(timeline.poll(runs, [late])) == ["resolve: plan written", "resolve completed in 3.0 s",
                                                  "find-image started"]
    assert timeline.poll(runs, []) == []


def test_durations_read_at_a_glance():
    assert [duration(timedelta(seconds=s)) for s in (0.84, 59.9, 61, 3725)] == ["0.8 s", "59.9 s", "1m 01s", "1h 02m"]


def test_a_pipe_gets_every_update_as_a_line_with_brackets_kept_not_read_as_markup():
    out = io.StringIO()
    with display(Console(file=out, force_terminal=False, width=200)) as show:
        show(Update(T0, "build: step 5/9: RUN pip install flagscale[serve]"))
        show(Update(T0, "evaluate: arithmetic: interval [+1.20, +8.80] -> FAIL", lasting=True, tone="fail"))
    assert out.getvalue().splitlines() == ["build: step 5/9: RUN pip install flagscale[serve]",
                                           "evaluate: arithmetic: interval [+1.20, +8.80] -> FAIL"]


def test_ask_stack_reports_how_far_it_is(monkeypatch):
    arithmetic = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    items = load_items("arithmetic", arithmetic, limit=3)
    unreachable = f"http://127.0.0.1:{free_port()}/v1"  # every request fails at once, and still counts as answered
    heard: list[tuple[int, int, float]] = []
    ask_stack(unreachable, "m", items, arithmetic, repeats=(0, 1), retries=0, timeout_s=5, progress=lambda *a: heard.append(a))
    assert [(done, total) for done, total, _ in heard] == [(6, 6)]  # within PROGRESS_EVERY_S: only the last
    monkeypatch.setattr(flows.evaluate.client, "PROGRESS_EVERY_S", 0.0)
    heard.clear()
    ask_stack(unreachable, "m", items, arithmetic, retries=0, timeout_s=5, progress=lambda *a: heard.append(a))
    assert [done for done, _, _ in heard] == [1, 2, 3] and all(rate > 0 for _, _, rate in heard)
