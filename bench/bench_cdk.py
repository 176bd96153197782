"""How long `cdk synth` of all three environments takes, beside the cost of synthesising an empty CDK app in the
same run (the jsii/Node.js start that every CDK app pays).

Each round runs, in fresh processes and interleaved (drift hits all alike): an empty app with one empty stack; the
whole app (dev, staging, prod; cdk-nag on) with bundling skipped; and the whole app with bundling (the layer and
the six function packages built by layers/build.py; its pip cache warm after the first round).

    python bench/bench_cdk.py [--rounds 3] [--no-bundling]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, pct  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EMPTY_APP = """
import aws_cdk as cdk
app = cdk.App()
cdk.Stack(app, "empty")
app.synth()
"""


def run(argv: list[str], *, bundling: bool) -> float:
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    if not bundling:
        context["aws:cdk:bundling-stacks"] = []
    with tempfile.TemporaryDirectory(prefix="cdkbench") as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TMUXI_"))}
        env.update(CDK_OUTDIR=out, CDK_CONTEXT_JSON=json.dumps(context),
                   JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION="1")
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{proc.stderr[-3000:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-bundling", action="store_true", help="skip the round with package builds")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    kinds = {"empty app (baseline)": ([sys.executable, "-c", EMPTY_APP], False),
             "3 environments, bundling skipped": ([sys.executable, "-m", "cdk.app"], False)}
    if not args.no_bundling:
        kinds["3 environments, packages built"] = ([sys.executable, "-m", "cdk.app"], True)
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.rounds):
        for name, (argv, bundling) in kinds.items():
            samples[name].append(run(argv, bundling=bundling))
            print(f"  round {i + 1}/{args.rounds} {name}: {samples[name][-1]:.1f} s", file=sys.stderr)
    base = statistics.median(samples["empty app (baseline)"])
    print(f"{'what':36} {'p50 s':>7} {'max s':>7} {'x empty':>8}")
    for name, xs in samples.items():
        med = statistics.median(xs)
        print(f"{name:36} {med:7.1f} {pct(xs, 100):7.1f} {med / base:8.2f}")
    print("target: all three environments in at most 60 s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
