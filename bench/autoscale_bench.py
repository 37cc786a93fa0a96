"""Autoscaling against issue 16's bars, on a local cluster with the defaults of `spec.autoscaling`.

The operator and the router run as real processes against a real API server; the model pods
are kwok pods answered by fake vLLM pods at their IPs (devtools/autoscaling.py, the same
scenarios the e2e tests assert with shorter windows). Prints each scenario's figures and its
bar, and the JSON of everything at the end. Runs about 8 minutes (--quick: 3).

    PYTHONPATH=. .venv/bin/python bench/autoscale_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.autoscaling import (  # noqa: E402
    Stack,
    burst,
    cold_wake,
    idle_deadline,
    operator_restart,
    square_wave,
    step_up,
)
from devtools.cluster import LOOPBACK_POD_CIDR, ClusterSpec, LocalCluster  # noqa: E402
from devtools.operator_process import install_crd  # noqa: E402
from devtools.processes import exit_on_signals  # noqa: E402


def bar(name: str, ok: bool, figures: str) -> dict[str, Any]:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {figures}", flush=True)
    return {"bar": name, "pass": ok, "figures": figures}


def run(quick: bool) -> list[dict[str, Any]]:
    cluster = LocalCluster(ROOT / ".local" / "bench-autoscale", ClusterSpec(pod_cidr=LOOPBACK_POD_CIDR))
    print("starting a local cluster ...", flush=True)
    cluster.start(timeout=300)
    results: list[dict[str, Any]] = []
    stack: Stack | None = None
    try:
        install_crd(cluster)
        cluster.create_namespace("bench")
        stack = Stack(cluster, "bench", cluster.root).start()

        wake = cold_wake(stack, "cold", count=50)
        print(json.dumps(wake), flush=True)
        results.append(
            bar(
                "50 concurrent requests at 0 replicas",
                wake["failed"] == 0
                and wake["writes"] == 1
                and (wake["write_after_first_request_s"] or 9) <= 0.2
                and (wake["first_byte_after_ready_s"] or 9) <= 0.5,
                f"failed {wake['failed']}, scale writes {wake['writes']}, write "
                f"{wake['write_after_first_request_s']:.3f}s after the first request, last first byte "
                f"{wake['first_byte_after_ready_s']:.3f}s after pod Ready",
            )
        )

        step = step_up(stack, "step", target=8, factor=4)
        print(json.dumps(step), flush=True)
        delay = step["decision_after_step_s"]
        results.append(
            bar(
                "idle -> 4x one replica's capacity",
                delay is not None and delay <= 2.0,
                f"scale-up write {delay:.2f}s after the step, replicas {step['replicas']}"
                if delay is not None
                else "no scale-up",
            )
        )

        cycles = 2 if quick else 4
        wave = square_wave(
            stack, "wave", period=60, cycles=cycles, high=24, minReplicas=1, maxReplicas=4, targetInFlight=8
        )
        print(json.dumps(wave), flush=True)
        after_first = wave["changes_per_cycle"][1:]
        results.append(
            bar(
                "square wave, 60 s period (defaults: stable 60 s, scale-down delay 120 s)",
                all(c <= 2 for c in after_first) and not wave["scale_downs_inside_delay"],
                f"changes per cycle {wave['changes_per_cycle']} (bar: <= minReplicas + 1 = 2 after the "
                f"first), scale-downs inside the delay {wave['scale_downs_inside_delay']}, "
                f"{wave['requests']} requests, {wave['failed']} failed",
            )
        )

        restart = operator_restart(stack, "restart")
        print(json.dumps(restart), flush=True)
        results.append(
            bar(
                "operator restarted mid-scale-up",
                not restart["went_back"] and restart["failed"] == 0,
                f"replicas seen {restart['replicas_seen']} (restart at {restart['replicas_at_restart']}), "
                f"{restart['requests']} requests under load, {restart['failed']} failed",
            )
        )

        # None: the moment the router reports the park, tens of ms before the zero write.
        offsets: list[float | None] = [None, 0.0] if quick else [None, None, None, -0.5, 0.0, 0.5, 1.0]
        lost = 0
        inflight: list[int] = []
        rounds: list[str] = []
        for i, offset in enumerate(offsets):
            idle = idle_deadline(stack, f"idle-{i}", idle=10, count=100, offset=offset)
            print(json.dumps(idle), flush=True)
            lost += idle["failed"]
            inflight += idle["in_flight_at_zero"]
            at = "at the park" if offset is None else f"{offset:+.2f}s"
            rounds.append(f"{at}: replicas {idle['replicas']}, slowest {idle['slowest_s']}s")
        results.append(
            bar(
                "100 requests at the idle deadline",
                lost == 0 and all(c == 0 for c in inflight),
                f"{len(offsets)} rounds, {lost} dropped, in flight at the pods when replicas turned 0: "
                f"{inflight}; by offset from the deadline: {'; '.join(rounds)}",
            )
        )

        stack.apply(
            {
                "apiVersion": "serving.vllm-operator.io/v1alpha1",
                "kind": "VLLMModel",
                "metadata": {"name": "dozy"},
                "spec": {
                    "model": "/models/dozy",
                    "replicas": 0,
                    "autoscaling": {"minReplicas": 0, "maxReplicas": 1},
                },
            }
        )
        stack.router.stop()
        stack.router.start()
        answers = burst(stack.router.url, "dozy", 20)
        writes = stack.timeline.writes("dozy")
        results.append(
            bar(
                "router restarted at zero",
                all(a.status == 200 for a in answers) and [r for _, r in writes] == [1],
                f"{sum(a.status == 200 for a in answers)}/20 answered, writes {[r for _, r in writes]}",
            )
        )
        time.sleep(1)
    finally:
        if stack is not None:
            stack.stop()
        cluster.stop()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer cycles and rounds")
    args = parser.parse_args(argv)
    exit_on_signals()
    results = run(args.quick)
    print(json.dumps(results, indent=2))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
