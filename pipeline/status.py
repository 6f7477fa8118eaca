"""Per-step progress of a run: blocks done and failed, voxels/s, ETA.

    python pipeline/status.py CONFIG [--json]

Reads RUN_DIR/progress.jsonl, which predict.py appends to while it runs, so
this works from another terminal during a run and after it ended (or died).
Figures are for the latest (re)start of the run; blocks skipped because an
earlier start finished them count as done but not towards the speed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipeline/status.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import cli_main, run_command
from pipeline.errors import UserError
from pipeline.orchestration.run_layout import RunDir

def read_status(progress: Path, now: float | None = None) -> dict:
    records = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(records) if r["step"] == "run" and r["event"] == "start"]
    records = records[starts[-1]:] if starts else records
    now = time.time() if now is None else now
    finished = any(r["step"] == "run" and r["event"] == "finish" for r in records)
    steps: dict[str, dict] = {}
    for record in records:
        if record["step"] == "run":
            continue
        step = steps.setdefault(record["step"], {"state": "running", "first_t": record["t"]})
        step["last_t"] = record["t"]
        if "total" in record:
            step.update({k: record[k] for k in ("total", "completed", "skipped", "failed", "voxels_per_block")})
            if (record["processing"] or step["completed"] > step["skipped"]) and "active_t" not in step:
                # the speed clock starts when this step's first block does
                step["active_t"] = record["t"]
        if record["event"] == "finish":
            step["state"] = "done" if record.get("completed", 0) == record.get("total", 0) else "failed"
            if "wall_s" in record:
                step["wall_s"] = record["wall_s"]
    for name, step in steps.items():
        if "total" not in step:
            continue
        fresh = step["completed"] - step["skipped"]
        end = step["last_t"] if step["state"] != "running" else now
        elapsed = end - step.get("active_t", end)
        rate = fresh / elapsed if elapsed > 0 and fresh > 0 else None
        step["voxels_per_s"] = rate * step["voxels_per_block"] if rate else None
        remaining = step["total"] - step["completed"]
        step["eta_s"] = 0.0 if remaining == 0 else (remaining / rate if rate else None)
    return {"finished": finished, "steps": steps}


def format_status(status: dict, steps: tuple[str, ...]) -> str:
    lines = [f"{'step':<12}{'state':<9}{'done':>12}{'failed':>8}{'voxels/s':>12}{'ETA':>9}"]
    for name in steps:
        step = status["steps"].get(name)
        if step is None:
            lines.append(f"{name:<12}{'waiting':<9}")
            continue
        if "total" not in step:
            wall = f"{step['wall_s']:.1f} s" if "wall_s" in step else ""
            lines.append(f"{name:<12}{step['state']:<9}{wall:>12}")
            continue
        speed = f"{step['voxels_per_s'] / 1e6:.2f}M" if step["voxels_per_s"] else "-"
        eta = f"{step['eta_s']:.0f} s" if step["eta_s"] is not None else "-"
        done = f"{step['completed']}/{step['total']}"
        lines.append(f"{name:<12}{step['state']:<9}{done:>12}{step['failed']:>8}{speed:>12}{eta:>9}")
    lines.append("run finished" if status["finished"] else "run not finished (running, or stopped: re-run predict.py to resume)")
    return "\n".join(lines)


def main() -> None:
    config, args = run_command("status", __doc__, "print the status as JSON")
    run_dir = RunDir(Path(config.run_dir))
    if not run_dir.progress.exists():
        raise UserError(f"run_dir: {config.run_dir} has no progress log yet; has predict.py been started?")
    status = read_status(run_dir.progress)
    steps = run_dir.read_layout().steps(evaluated=config.ground_truth is not None)
    print(json.dumps(status, indent=2) if args.json else format_status(status, steps))


if __name__ == "__main__":
    cli_main(main)
