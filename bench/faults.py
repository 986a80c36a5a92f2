"""Faults: kill -9 a worker rank, or the Coordinator replica, while streams run; measure recovery.

    RAY_AUTH_MODE=token python bench/faults.py --url http://127.0.0.1:8000 --ray-address 127.0.0.1:6379 \
        [--fault worker,coordinator] [--streams 8] [--api-key KEY] [--out faults.json]

For each fault: S streams start (long generations), a few seconds later the process of one worker
actor (`nmoe-worker-*-r<k>`) or of the Coordinator replica gets SIGKILL, and the script records,
per stream, how it ended and how long after the kill (an error event in the stream, or a failed
status), what the error said (it must name only the client's own request), and, polling with one
short request every 0.5 s, how long after the kill the service answers again (the group restarts
by itself, or Serve restarts the replica: no operator). Loopback only; the processes must be on
this machine. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
from overload import loopback_only
from report import print_table, write_json


def victim_pid(kind: str) -> tuple[int, str]:
    """(pid, name) of the process to kill: a worker rank, or the Coordinator replica."""
    from ray.util.state import list_actors

    alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)]
    if kind == "worker":
        ranks = sorted((a for a in alive if (a.name or "").startswith("nmoe-worker-")), key=lambda a: a.name)
        if not ranks:
            raise SystemExit(
                "no live worker actor named nmoe-worker-*: is an EP group (ep_size > 1) serving?"
            )
        actor = ranks[len(ranks) // 2]
    else:
        replicas = [
            a
            for a in alive
            if a.class_name.startswith("ServeReplica:") and a.class_name.endswith(":Coordinator")
        ]
        if not replicas:
            raise SystemExit("no live Coordinator replica: is the application running?")
        actor = replicas[0]
    return actor.pid, actor.name or actor.class_name


async def stream(client: httpx.AsyncClient, model: str, index: int, killed: list[float]) -> dict:
    body = {
        "model": model,
        "prompt": [3 + index] * 20,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                message = (await response.aread()).decode(errors="replace")
                return {"end": f"HTTP {response.status_code}", "message": message, "at": time.perf_counter()}
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        return {
                            "end": "error event",
                            "message": event["error"]["message"],
                            "at": time.perf_counter(),
                        }
            return {"end": "completed", "message": "", "at": time.perf_counter()}
    except httpx.HTTPError as e:
        return {"end": f"client {type(e).__name__}", "message": "", "at": time.perf_counter()}


async def back_after(client: httpx.AsyncClient, model: str, killed: float, limit_s: float) -> float | None:
    while time.perf_counter() - killed < limit_s:
        try:
            response = await client.post(
                "/v1/completions", json={"model": model, "prompt": [5], "max_tokens": 2}
            )
            if response.status_code == 200:
                return time.perf_counter() - killed
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    return None


async def one_fault(args: argparse.Namespace, kind: str, model: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=600, headers=headers) as client:
        killed: list[float] = []
        streams = [asyncio.ensure_future(stream(client, model, i, killed)) for i in range(args.streams)]
        await asyncio.sleep(args.kill_after)
        pid, name = victim_pid(kind)
        os.kill(pid, signal.SIGKILL)
        at = time.perf_counter()
        print(f"{kind}: killed {name} (pid {pid})", flush=True)
        ends = await asyncio.gather(*streams)
        back = await back_after(client, model, at, args.recovery_timeout)
    return {
        "fault": kind,
        "victim": name,
        "streams": [
            {"end": e["end"], "after_kill_s": e["at"] - at, "message": e["message"][:300]} for e in ends
        ],
        "serving_again_after_s": back,
    }


async def main_async(args: argparse.Namespace) -> dict:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=args.ray_address, log_to_driver=False, _node_ip_address="127.0.0.1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=30, headers=headers) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
    results = []
    for kind in args.fault:
        results.append(await one_fault(args, kind, model))
    return {"url": args.url, "faults": results}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", type=loopback_only)
    parser.add_argument("--ray-address", default="127.0.0.1:6379")
    parser.add_argument("--api-key")
    parser.add_argument("--fault", type=lambda s: s.split(","), default=["worker", "coordinator"])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=5.0, help="seconds of streaming before the kill")
    parser.add_argument("--recovery-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("faults.json"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    write_json(args.out, result)
    rows = []
    for f in result["faults"]:
        ends = [s["after_kill_s"] for s in f["streams"]]
        rows.append(
            {
                "fault": f["fault"],
                "streams": len(f["streams"]),
                "how they ended": ", ".join(sorted({s["end"] for s in f["streams"]})),
                "ended after kill (s)": f"{min(ends):.1f}-{max(ends):.1f}",
                "serving again after (s)": "never"
                if f["serving_again_after_s"] is None
                else f"{f['serving_again_after_s']:.1f}",
            }
        )
    print_table("faults", rows, list(rows[0]) if rows else [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
