"""Our vLLM plugin on a GPU, judged by the project's own evaluate stage (lent H200: benchmarks/h200-2026-12-04-vllm,
benchmarks/h100-2026-12-05-tokens: the lent kind came as an H100).

vLLM serves one converted checkpoint (bf16, our kernels compiled by Triton) as four stacks on one GPU, each with
the operator report (engine/report.py) and our plugin found through its `vllm.general_plugins` entry point:
native (USE_FLAGGEMS=0), FlagOS (USE_FLAGGEMS=1), the mild fault (FLAGOS_FAULT=norm-eps-x100, invisible to accuracy)
and the must-fail control (FLAGOS_FAULT=gate-up-swapped). The evaluate stage compares each of the three with native
over --items arithmetic prompts through their URLs, the operator checks on, and reports the token-level signal
(both stacks score native's replies to the first --token-items items with prompt logprobs; native scores them twice,
the floor) without gating it. Each stack's operator report is kept from before and after, and its output tokens/s
is timed with --chats concurrent chats of --tokens tokens each (ignore_eos; --rounds 0 skips it). Eager by default
(`--enforce-eager`); `--compiled` serves native and FlagOS with compiled and CUDA graphs instead (ours switched on
through compilation_config custom_ops, after checking that FlagOS without them refuses to start) and times them
alone. `--upcycle` first makes the up-cycled MoE of the dense checkpoint (`python3 -m engine.upcycle`) and serves
that as native, FlagOS and FLAGOS_FAULT=moe-not-renormalized instead; a stack that fails to start is recorded (the
engine core's error) and the others go on. Reports go to --out, the servers' logs to --logs.

    PYTHONPATH=<vllm's site> python3 scripts/h200_vllm_proof.py --model <checkpoint folder> --out $OUT \
        [--compiled | --upcycle]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import openai
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.operators import STACK_VARIABLES  # noqa: E402
from flows.evaluate.benchmarks import load_definitions, load_items  # noqa: E402
from flows.evaluate.client import ask_stack  # noqa: E402
from flows.evaluate.operators import operator_report  # noqa: E402
from flows.evaluate.stage import Endpoint, Evaluation, evaluate, image_sources  # noqa: E402
from flows.evaluate.store import ResultStore  # noqa: E402
from flows.matrix import Benchmark, Suite, load_matrix  # noqa: E402
from flows.plan import resolve  # noqa: E402
from flows.settings import Settings  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent
STACKS = {"native": {"USE_FLAGGEMS": "0"}, "flagos": {"USE_FLAGGEMS": "1"},
          "mild": {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "norm-eps-x100"},
          "broken": {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "gate-up-swapped"}}
MOE_STACKS = {"native": {"USE_FLAGGEMS": "0"}, "flagos": {"USE_FLAGGEMS": "1"},
              "unrenormalized": {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "moe-not-renormalized"}}
EAGER = ["--enforce-eager"]
OUR_LAYERS = json.dumps({"custom_ops": ["+RMSNorm", "+SiluAndMul", "+RotaryEmbedding"]})
COMPILED = {"native": [], "flagos": ["--compilation-config", OUR_LAYERS]}
CAUSE = re.compile(r"^\(EngineCore[^)]*\) ((?:\w+\.)*\w*(?:Error|Unsupported): .*)")  # a traceback's last line
# A fixed KV cache skips vLLM's memory profiling, which would count the other servers starting beside it
SERVE = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.3",
         "--kv-cache-memory-bytes", str(8 << 30), "--middleware", "engine.report.operator_route",
         "--worker-extension-cls", "engine.report.OperatorReportExtension"]


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    log: Path
    started: float
    startup_s: float | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(name: str, model: Path, served_name: str, environment: dict[str, str], flags: list[str],
          logs: Path) -> Server:
    """`vllm serve` in its own process group (its engine core and workers end with it)."""
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key not in STACK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    log = logs / f"{name}.log"
    with log.open("w") as handle:  # a pipe would fill and block the server
        process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--served-model-name",
             served_name, "--port", str(port), *SERVE, *flags], env={**env, **environment}, cwd=PROJECT_DIR,
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, process, f"http://127.0.0.1:{port}/v1", log, time.monotonic())


def wait_ready(server: Server, timeout_s: float) -> bool:
    """True once /v1/models answers; False when the server exits first (its log says why)."""
    deadline = server.started + timeout_s
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            if requests.get(server.url + "/models", timeout=2).status_code == 200:
                server.startup_s = time.monotonic() - server.started
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def failure(server: Server) -> dict[str, object]:
    """Why a server did not serve: the engine core's own error (the API server's traceback after it says only that
    the core failed) and the log's last lines."""
    lines = server.log.read_text(errors="replace").splitlines()
    causes = [match.group(1) for line in lines if (match := CAUSE.search(line))]
    return {"exit": server.process.poll(), "cause": causes[0] if causes else None, "log_tail": lines[-15:]}


async def _chats(url: str, model: str, prompts: list[str], max_tokens: int) -> tuple[float, int, int]:
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)

    async def chat(prompt: str) -> int:
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": True})
        return reply.usage.completion_tokens

    try:
        started = time.perf_counter()
        done = await asyncio.gather(*(chat(p) for p in prompts), return_exceptions=True)
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return elapsed, sum(d for d in done if isinstance(d, int)), sum(not isinstance(d, int) for d in done)


def throughput(url: str, model: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """All chats at once, every one `max_tokens` long: the engine's continuous batching at full concurrency."""
    elapsed, tokens, errors = asyncio.run(_chats(url, model, prompts, max_tokens))
    return {"chats": len(prompts), "seconds": elapsed, "output_tokens": tokens,
            "output_tokens_per_s": tokens / elapsed, "errors": errors}


def timed(servers: dict[str, Server], model: str, prompts: list[str], max_tokens: int, rounds: int) -> dict:
    """Each stack alone, stacks alternating round by round (drift shows as a spread, not as a ratio)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    for _ in range(rounds):
        for name, server in servers.items():
            runs[name].append(throughput(server.url, model, prompts, max_tokens))
    best = {name: max(r["output_tokens_per_s"] for r in rs) for name, rs in runs.items()}
    mean = {name: statistics.fmean(r["output_tokens_per_s"] for r in rs) for name, rs in runs.items()}
    return {"runs": runs, "best_output_tokens_per_s": best, "mean_output_tokens_per_s": mean,
            "ratio": {f"{name}/native": best[name] / best["native"] for name in best if name != "native"},
            "ratio_of_means": {f"{name}/native": mean[name] / mean["native"] for name in mean if name != "native"}}


def upcycled(dense: Path, out: Path) -> dict[str, object]:
    """The up-cycled MoE of `dense` at `out` (made here unless a finished one is there): engine.upcycle's defaults."""
    started = time.monotonic()
    if not (out / "config.json").is_file():
        made = subprocess.run([sys.executable, "-m", "engine.upcycle", str(dense), str(out)], cwd=PROJECT_DIR,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")]))},
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"engine.upcycle failed ({made.returncode}): {made.stderr.strip()}")
    config = json.loads((out / "config.json").read_text())
    return {"path": str(out), "seconds": time.monotonic() - started, "architectures": config.get("architectures"),
            "recipe": config.get("flagrelease_upcycle"), "layers": config.get("num_hidden_layers")}


def gated(plan, store: ResultStore, candidate_url: str, native_url: str, out: Path, name: str) -> dict:
    """One comparison through the evaluate stage, as `flagrelease evaluate` would gate the two endpoints, with the
    token-level signal (FlagOS vs native, and native vs native) as the stage measured it."""
    candidate, reference = image_sources(plan, "unused", Path("/nonexistent"), Endpoint(candidate_url),
                                         Endpoint(native_url))
    evaluation = Evaluation(plan=plan, benchmarks_file=PROJECT_DIR / "benchmarks.yaml", store=store,
                            candidate=candidate, reference=reference, operators=[], concurrency=256,
                            perf_concurrencies=(64,))
    report = evaluate(evaluation, None, print)
    (out / f"h200-{name}-vs-native.json").write_text(report.model_dump_json(indent=1))
    gate, signal_, tokens = report.outcomes[0].gate, report.outcomes[0].signal, report.outcomes[0].tokens
    return {"verdict": report.verdict.value, "passed": report.passed,
            "accuracy_verdict": gate.verdict.value if gate else None,
            "unavailable": report.outcomes[0].unavailable, "signal": signal_.model_dump() if signal_ else None,
            "tokens": tokens.model_dump() if tokens else None,
            **({"native": gate.native_accuracy, "flagos": gate.flagos_accuracy, "drop": gate.drop,
                "interval": [gate.ci_low, gate.ci_high], "detectable": gate.detectable_drop,
                "agreement": gate.agreement, "mcnemar_p": gate.mcnemar_p} if gate else {}),
            "calls": {role: {o.name: o.calls for o in use.operators if o.calls}
                      for role in ("flagos", "native") if (use := report.operator_use(role))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a safetensors checkpoint (python3 -m "
                        "engine.checkpoint converts the release's GGUF)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--token-items", type=int, default=256, help="items scored token by token (prompt logprobs)")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--upcycle", type=Path, nargs="?", const=Path("/tmp/flagos-upcycled-moe"), default=None,
                        metavar="MOE_DIR", help="serve the up-cycled MoE of --model, made at MOE_DIR "
                        "(default /tmp/flagos-upcycled-moe) by `python3 -m engine.upcycle` unless already there")
    parser.add_argument("--store", type=Path, default=None, help="default /tmp/flagos-vllm-store[-moe]")
    parser.add_argument("--logs", type=Path, default=None, help="the servers' logs (default --out/logs)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for a server to answer")
    args = parser.parse_args()
    # `timeout` sends SIGTERM: exit through the ExitStack, so the servers (their own sessions) are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.compiled and args.upcycle:
        parser.error("--compiled and --upcycle are separate runs")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.logs or args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plan = resolve(load_matrix(PROJECT_DIR / "releases.yaml"), "smollm2-cpu", Settings(offline=True))
    plan = plan.model_copy(update={"suite": Suite(version=1, benchmarks={
        "arithmetic": Benchmark(margin_pp=3.0, limit=args.items, token_gate=False, token_items=args.token_items)})})
    served_name = plan.model.served_name
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    items = load_items("arithmetic", definition, args.items)
    prompts = [items[i % len(items)].prompt for i in range(args.chats)]
    mode = "compiled" if args.compiled else "moe-eager" if args.upcycle else "eager"
    prefix = "moe-" if args.upcycle else ""
    stacks = MOE_STACKS if args.upcycle else STACKS
    summary: dict[str, object] = {"mode": mode, "items": args.items, "token_items": args.token_items,
                                  "chats": args.chats, "tokens": args.tokens,
                                  "stacks": {name: stacks[name] for name in (COMPILED if args.compiled else stacks)}}
    summary_file = args.out / f"h200-vllm-{mode}.json"

    def save() -> None:  # after each step: a call cut short still returns what was measured
        summary_file.write_text(json.dumps(summary, indent=1))

    model = args.model
    if args.upcycle:
        summary["upcycle"] = upcycled(args.model, args.upcycle)
        model = args.upcycle
        save()
    with ExitStack() as stack:
        if args.compiled:  # our layers must refuse a configuration in which vLLM would route around them
            refused = start("flagos-default-ops", model, served_name, STACKS["flagos"], [], logs)
            stack.callback(stop, refused)
            served = wait_ready(refused, args.timeout)
            summary["flagos_default_ops"] = {"served": served, **({} if served else failure(refused))}
            stop(refused)
            flags = COMPILED
        else:
            flags = {name: EAGER for name in stacks}
        servers = {}
        for name, extra in flags.items():
            servers[name] = start(name, model, served_name, stacks[name], extra, logs)
            stack.callback(stop, servers[name])
        failed = {name: failure(s) for name, s in servers.items() if not wait_ready(s, args.timeout)}
        summary["startup_s"] = {name: s.startup_s for name, s in servers.items()}
        if failed:  # the others go on (compiled: native is still timed on its own, for the record)
            summary["failed"] = failed
            if "native" in failed:
                save()
                print(json.dumps(summary, indent=1))
                return 1
            for name in failed:
                stop(servers[name])
                print(f"{name} did not serve: {failed[name]['cause']}", flush=True)
            servers = {name: server for name, server in servers.items() if name not in failed}
        save()
        summary["reports_before"] = {name: operator_report(s.url) for name, s in servers.items()}
        warmup: dict[str, dict[str, object]] = {}
        for name, server in servers.items():  # warm-up: our kernels compile at their first launches
            errors = [r.error for r in ask_stack(server.url, served_name, items[:256], definition, concurrency=256)
                      if r.error is not None]
            warmup[name] = {"errors": len(errors), "first_error": errors[0] if errors else None}
        summary["warmup"] = warmup
        save()
        if not args.compiled:
            store = ResultStore(args.store or Path(f"/tmp/flagos-vllm-store{'-moe' if args.upcycle else ''}"))
            for name in servers:  # one store: the native answers, their second run and their scores asked once
                if name != "native":
                    try:
                        summary[name] = gated(plan, store, servers[name].url, servers["native"].url, args.out,
                                              prefix + name)
                    except Exception as exc:  # a stack that served, then failed: recorded, the others go on
                        summary[name] = {"error": f"{type(exc).__name__}: {exc}", **failure(servers[name])}
                        print(f"{name}: {summary[name]['error']}", flush=True)
                    save()
        if args.rounds:
            summary["throughput"] = timed(servers, served_name, prompts, args.tokens, args.rounds)
        summary["reports_after"] = {name: operator_report(s.url) for name, s in servers.items()}
    save()
    print(json.dumps({key: value for key, value in summary.items() if not key.startswith("reports")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
