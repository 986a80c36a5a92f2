"""The simulator's honesty check on the CPU tiny model: simulated TTFT and ITL against a real run.

    python bench/sim_check.py [--concurrency 16 --prompt-tokens 128 --output-tokens 32 --requests 96] \
        [--calibrate 4,32] [--in-process] [--out-dir sim_check]

1. A local Ray cluster serves configs/dev.toml at ep_size 1 (`serve run`, OpenAI API on a free
   port).
2. Step costs, measured as served: bench/latency.py runs at the --calibrate concurrencies (same P
   and N, not the checked C); the Coordinator deployment logs every step's busiest-rank shape and
   period (`recent_steps`), and those steps are fitted into a StepCostModel (fit error printed).
   With --in-process, bench/step_costs.py also measures the engine alone (one torch thread, no
   Serve), for a second model.
3. The real run: bench/latency.py at C, P, N, a chunk per token (--token-chunks).
4. The simulation with each model, on the same config and workload (overlapped steps, as served).
   Each model is simulated without a front end and with one (per-request and per-token times,
   sim/simulator.py FrontEnd) fitted to the calibration runs' TTFT p50 and ITL p50.
5. TTFT p50 and ITL p50, simulated against measured: the check passes within --tolerance (25%)
   for the model fitted to served steps with the fitted front end; the others are reported.

Writes into --out-dir: the points, the models, latency*.json/png, sim*.json/png and check.json
(the comparison, the machine and its load). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from nmoe_serve.config import ServeConfig
from nmoe_serve.sim.cli import scheduler_limits
from nmoe_serve.sim.cost_model import StepCostModel, load_points
from nmoe_serve.sim.report import print_summary, write_json, write_png
from nmoe_serve.sim.simulator import Simulator
from nmoe_serve.sim.workload import Workload

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "dev.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = REPO) -> None:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def stop_cluster(temp_dir: str) -> None:
    """End the processes of our own Ray cluster (its command lines name `temp_dir`) and their
    children, by pid: `ray stop` would end every Ray process on the machine, other users' too."""

    def processes() -> dict[int, tuple[int, str]]:  # pid -> (parent pid, command line)
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                found[int(entry.name)] = (parent, cmdline)
        return found

    table = processes()
    me, ancestors = os.getpid(), set()
    while me in table and me not in ancestors:  # never this process or the shell that started it
        ancestors.add(me)
        me = table[me][0]
    ours = {pid for pid, (_, cmdline) in table.items() if temp_dir in cmdline} - ancestors
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in ours} - ours
        grew, ours = bool(children), ours | children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ours):
            time.sleep(0.2)


@contextlib.contextmanager
def served(
    out: Path, env: dict[str, str], overrides: dict | None = None, name: str = "ep1"
) -> Iterator[tuple[str, int]]:
    """(url, gcs port) of configs/dev.toml served with `overrides` (default: ep_size 1) on a local
    Ray cluster of our own; `name` names its files in `out`."""
    gcs, http = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-simcheck-")  # short: Ray's socket paths must stay < 108 chars
    try:
        run(["ray", "start", "--head", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp_dir}"], env)  # fmt: skip
    except (SystemExit, subprocess.TimeoutExpired):
        stop_cluster(temp_dir)  # a start that timed out leaves its GCS and monitors behind
        raise
    spec = out / f"serve-{name}.yaml"
    app = {"name": "nmoe", "route_prefix": "/", "import_path": "nmoe_serve.serve.app:build_app",
           "args": {"config": str(CONFIG), "overrides": overrides or {"ep_size": 1}}}  # fmt: skip
    spec.write_text(yaml.safe_dump({"proxy_location": "HeadOnly", "applications": [app],
                                    "http_options": {"host": "127.0.0.1", "port": http}}))  # fmt: skip
    log = (out / f"serve-{name}.log").open("w")
    serve = subprocess.Popen(
        ["serve", "run", str(spec), f"--address=127.0.0.1:{gcs}"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "serve run did not come up:\n" + (out / f"serve-{name}.log").read_text()[-3000:]
                )
            time.sleep(1)
        yield url, gcs
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        stop_cluster(temp_dir)
        log.close()


def latency(
    url: str, concurrency: int, requests: int, args: argparse.Namespace, out: Path, env: dict[str, str]
) -> dict:
    cmd = [sys.executable, "latency.py", "--url", url, "--concurrency", str(concurrency), "--requests", str(requests),
           "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens), "--token-chunks",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, env=env, cwd=REPO / "bench", check=True, timeout=1800)
    return json.loads(out.read_text())


RECENT_STEPS = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", logging_level="ERROR")
handle = serve.get_deployment_handle("Coordinator", app_name="nmoe")
print(json.dumps(handle.recent_steps.remote(sys.argv[2] == "clear").result()))
"""


def recent_steps(gcs: int, env: dict[str, str], clear: bool) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", RECENT_STEPS, f"127.0.0.1:{gcs}", "clear" if clear else "keep"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"reading the coordinator's step log failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def served_points(steps: list[dict], out: Path) -> Path:
    points = [{**{k: s[k] for k in ("kind", "seqs", "tokens", "context_tokens", "attention_pairs")},
               "seconds": s["period_s"], "note": "measured: a served step's period (Coordinator.recent_steps)"}
              for s in steps if s["period_s"] > 0 and (s["tokens"] or s["kind"] == "decode")]  # fmt: skip
    path = out / "served_points.json"
    source = (f"steps served by configs/dev.toml at ep_size 1 (serve run, bench/latency.py --token-chunks "
              f"at the calibration concurrencies), host {os.uname().nodename} ({os.cpu_count()} CPUs)")  # fmt: skip
    path.write_text(
        json.dumps({"source": source, "date": time.strftime("%Y-%m-%d"), "points": points}, indent=1)
    )
    return path


Frontend = tuple[float, float]  # seconds per request, per streamed token


def simulator(model: StepCostModel, frontend: Frontend) -> Simulator:
    config = ServeConfig.from_toml(CONFIG, overrides={"ep_size": 1})
    limits = scheduler_limits(config, None)
    return Simulator(
        limits, model, overlap=config.scheduler.overlap, frontend_s=frontend[0], frontend_token_s=frontend[1]
    )


def fit_frontend(model: StepCostModel, calibration: dict[int, dict], args: argparse.Namespace) -> Frontend:
    """The front end (per request 0-40 ms, per token 0-4 ms, a grid) that best gives the calibration
    runs' TTFT p50 and ITL p50 (squared relative errors)."""

    def error(frontend: Frontend) -> float:
        total = 0.0
        for c, measured in calibration.items():
            workload = Workload(args.prompt_tokens, args.output_tokens, max(2 * c, 32), concurrency=c)
            summary = simulator(model, frontend).run(workload).summary()
            for key in ("ttft_s", "itl_s"):
                total += (summary[key]["p50"] / measured[key]["p50"] - 1) ** 2  # type: ignore[index]
        return total

    grid = [(r * 4e-3, t * 2e-4) for r in range(11) for t in range(21)]
    return min(grid, key=error)


def simulate(
    model: StepCostModel, frontend: Frontend, args: argparse.Namespace, out: Path, name: str
) -> dict:
    workload = Workload(args.prompt_tokens, args.output_tokens, args.requests, concurrency=args.concurrency)
    result = simulator(model, frontend).run(workload)
    title = f"simulated ({name}): {workload.describe()} on the CPU tiny model"
    print_summary(result, title)
    write_json(
        result,
        out / f"sim_{name}.json",
        {"config": str(CONFIG), "overrides": {"ep_size": 1}, "cost_model": name, "frontend_s": frontend},
    )
    write_png(result, out / f"sim_{name}.png", title)
    return result.summary()


def compare(measured: dict, simulated: dict) -> dict:
    rows = {}
    for name, key in (("ttft_p50_s", "ttft_s"), ("itl_p50_s", "itl_s")):
        real, sim = measured[key]["p50"], simulated[key]["p50"]
        rows[name] = {"measured": real, "simulated": sim, "error": sim / real - 1}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--calibrate", default="4,32", help="concurrencies whose served steps fit the model")
    parser.add_argument("--in-process", action="store_true", help="also fit a model to bench/step_costs.py")
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--out-dir", type=Path, default=Path("sim_check"))
    args = parser.parse_args()
    try:
        calibrate = [int(c) for c in args.calibrate.split(",")]
    except ValueError:
        raise SystemExit(f"--calibrate {args.calibrate!r}: give concurrencies, e.g. 4,32") from None
    if args.concurrency in calibrate:
        raise SystemExit(f"--calibrate must not include the checked concurrency {args.concurrency}")
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    load = {"start": os.getloadavg()}
    models = {}
    if args.in_process:
        print("step costs of the engine alone (bench/step_costs.py, one torch thread)", flush=True)
        subprocess.run([sys.executable, "step_costs.py", "--config", str(CONFIG), "--torch-threads", "1",
                        "--logprobs", "0", "--out", str(out / "in_process_points.json")],
                       env=env, cwd=REPO / "bench", check=True, timeout=3600)  # fmt: skip
        models["in_process"] = StepCostModel.fit_points(*load_points(out / "in_process_points.json"))
    with served(out, env) as (url, gcs):
        print(f"server up at {url}; warm-up, then calibration at C = {calibrate}", flush=True)
        latency(url, 4, 8, args, out / "warmup.json", env)
        recent_steps(gcs, env, clear=True)
        calibration = {
            c: latency(url, c, max(2 * c, 32), args, out / f"latency_calibrate_c{c}.json", env)
            for c in calibrate
        }
        steps = recent_steps(gcs, env, clear=True)
        models["served"] = StepCostModel.fit_points(*load_points(served_points(steps, out)))
        load["calibrated"] = os.getloadavg()
        print(f"the checked run: C = {args.concurrency}", flush=True)
        measured = latency(url, args.concurrency, args.requests, args, out / "latency.json", env)
        load["measured"] = os.getloadavg()
    check_rows, fits, frontends = {}, {}, {}
    for name, model in models.items():
        model.save(out / f"cost_model_{name}.json")
        fits[name] = model.fit
        for kind in ("none", "fitted"):
            frontend = (0.0, 0.0) if kind == "none" else fit_frontend(model, calibration, args)
            frontends[f"{name}, front end {kind}"] = {"request_s": frontend[0], "token_s": frontend[1]}
            simulated = simulate(model, frontend, args, out, f"{name}_frontend_{kind}")
            check_rows[f"{name}, front end {kind}"] = compare(measured, simulated)
    checked = "served, front end fitted"
    passed = all(abs(r["error"]) <= args.tolerance for r in check_rows[checked].values())
    check = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": f"{os.uname().nodename}, {os.cpu_count()} CPUs",
        "load_average": load,
        "workload": f"C={args.concurrency}, P={args.prompt_tokens}, N={args.output_tokens}, {args.requests} requests",
        "calibration_concurrencies": calibrate,
        "fits": fits,
        "frontend_s": frontends,
        "checked": checked,
        "comparison": check_rows,
        "tolerance": args.tolerance,
        "passed": passed,
        "measured": {k: measured[k] for k in ("ttft_s", "itl_s", "e2e_s", "output_tokens_per_s")},
    }
    (out / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    for name, rows in check_rows.items():
        for metric, r in rows.items():
            print(f"  {name:28} {metric}: measured {r['measured'] * 1e3:7.1f} ms, simulated "
                  f"{r['simulated'] * 1e3:7.1f} ms ({r['error']:+.1%})")  # fmt: skip
    print(
        f"{'PASSED' if passed else 'FAILED'} within {args.tolerance:.0%} ({checked}); wrote {out / 'check.json'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
