"""The CPU SDS step before and after the Prior/Rule/Representation seams, alternating in one
process tree on one machine (issue 13: the step must not get slower).

    git archive 54346ab src | (mkdir -p .before && tar -x -C .before)   # the code before the seams
    .venv/bin/python scripts/seams_before_after.py --before .before/src --out benchmarks

Each round runs `python -m sds3d.bench.cpu_step --skip-demo` once with the old sources first on the
path and once with these; the report gives every round's phase medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "54346ab"


def run(src: Path, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(src)}
        cmd = [sys.executable, "-m", "sds3d.bench.cpu_step", "--skip-demo", "--steps", str(steps),
               "--warmup", str(warmup), "--out", out]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
        return json.loads((Path(out) / "cpu_step.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="src/ of the code before the seams")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        pair = {v: run(p.resolve(), args.steps, args.warmup) for v, p in (("before", args.before), ("after", ROOT / "src"))}
        rounds.append({v: r["step_ms"] for v, r in pair.items()})
        print(f"round {i + 1}: before {pair['before']['step_ms']['step']:.1f} ms, after {pair['after']['step_ms']['step']:.1f} ms", flush=True)
    machine = pair["after"]["machine"]
    median = {v: statistics.median(r[v]["step"] for r in rounds) for v in ("before", "after")}
    command = "python scripts/seams_before_after.py " + " ".join(sys.argv[1:])
    report = {"command": command, "before_commit": BEFORE_COMMIT, "machine": machine, "rounds": rounds,
              "median_step_ms": median}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seams_before_after.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# The SDS step before and after the seams (CPU, default preset)", "",
        f"Command: `{command}` (before = commit {BEFORE_COMMIT}'s `src/`)  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}", "",
        "Median ms of each phase over the timed steps of `python -m sds3d.bench.cpu_step --skip-demo`, "
        "before and after alternating.", "",
        "| round | code | render | prior | backward | step |", "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for i, r in enumerate(rounds):
        for v in ("before", "after"):
            p = r[v]
            lines.append(f"| {i + 1} | {v} | {p['render']:.1f} | {p['prior']:.1f} | {p['backward']:.1f} | {p['step']:.1f} |")
    lines += ["", f"Median step over the rounds: before {median['before']:.1f} ms, after {median['after']:.1f} ms."]
    (args.out / "seams_before_after.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
