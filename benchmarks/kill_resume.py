"""kill -9 harness: a training run killed N times at random points must end as if never interrupted.

    python -m benchmarks.kill_resume --kills 20 --out DIR [--seed S] [--steps 20]

1. Reference: ``python -m pretrain.train --config tiny-cpu`` with the CPU
   tests' tiny overrides (random 2-layer ViT, 56 px, carphone; MLflow in a
   SQLite file, a checkpoint every step, keep 2, the feature cache inside the
   out dir) runs uninterrupted in ``DIR/reference``; its wall time T is measured.
2. Killed run, the same command in ``DIR/killed``: each start gets SIGKILL
   (to its whole process group) at a seeded random point; the next start
   resumes. Each kill draws a phase, then a delay uniform over 0..the
   reference's duration of that phase, counted from the phase's first sign in
   this start: start-up (imports, encoder, feature encoding; from launch),
   tracking set-up (resume, MLflow store creation and migration; from the
   trainer's summary line), the loop (one step, from this start's 1st-3rd
   checkpoint line), a checkpoint write (half a step, from its temp directory
   appearing: the write, the rename, the `latest` move, the pruning), or
   evaluation and export (1.1x, from the last checkpoint line, or in a
   finished run from evaluation's model build; drawn as a loop kill until one
   step is left). Delays
   uniform over 0..1.1 T from launch alone would put a few percent of kills in
   the loop; timing from the start's own signs survives a loaded machine.
   After N kills a last start runs to completion. ``--no-tracking`` runs both
   with MLflow off (a diagnostic).

Figures:

- kills: starts that were still running when SIGKILL arrived (returncode -9).
- resumes: starts that followed a kill.
- failed resumes: starts that exited non-zero on their own (first start
  included); must be 0. Their output tail is kept in the JSON.
- phase of each kill: read from the killed start's log; "checkpoint write",
  "export write" or "feature-cache write" when the kill left that writer's
  temporary behind or `latest` behind the newest tag (proof it landed mid-write). Also the newest complete
  ``step_*`` on disk and the `latest` pointer right after the kill.
- export identical: every tensor of the killed run's ``export/model.safetensors``
  ``torch.equal`` to the reference's (same names, dtypes) and the same
  ``config.json`` step.
- checkpoints verified: every ``step_*`` left passes ``verify_checkpoint`` and
  has its manifest.
- leftovers: entries of ``checkpoints/`` other than ``step_*`` directories and
  `latest`; ``.tmp-*``/``.old-*`` beside the export; any other temporary
  (``.tmp-*``, ``.old-*``, ``*.tmp``) anywhere in the killed run's out dir.
  Each must be 0.

Prints a per-kill table and a summary table (markdown), writes
``DIR/kill_resume.json``, and exits 1 if any check failed. Logs of every start
are in ``DIR/logs``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pretrain.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    tag_for,
    verify_checkpoint,
)
from tests.conftest import tiny_overrides

log = logging.getLogger("benchmarks.kill_resume")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The run directory is out_dir/run.name; tiny-cpu's name.
RUN_NAME = "tiny-cpu"
KILL_WINDOW_FACTOR = 1.1
PHASES = ("start-up", "tracking set-up", "loop", "checkpoint write", "finalize")
_MODEL_LINE = "pretrain.trainer: model:"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank0 ")
_CKPT_LINE = re.compile(r"pretrain\.checkpoint: checkpoint \S*/step_(\d+)\s*$")
_RESUMED_LINE = re.compile(r"resumed from \S+ at step (\d+)")


@dataclass(slots=True)
class Start:
    """One launch of the training command in the killed run's directory."""

    index: int
    resume: bool
    target: str
    trigger: str
    delay_s: float | None
    returncode: int | None = None
    wall_s: float = 0.0
    killed: bool = False
    kill_at_s: float | None = None
    landed: str = ""
    newest_step: int | None = None
    latest: str | None = None
    temporaries: list[str] = field(default_factory=list)
    log: str = ""
    tail: str = ""
    resumed_from: str = ""
    """This start's "resuming from ..." log line: which checkpoint it took, and why newer ones were passed over."""


def train_command(out_dir: Path, steps: int, tracking: bool = True) -> list[str]:
    tracking_args = [
        f"--tracking.enabled={'true' if tracking else 'false'}",
        f"--tracking.tracking_uri=sqlite:///{out_dir.resolve() / 'mlflow.db'}",
    ]
    overrides = tiny_overrides(
        out_dir, f"--train.steps={steps}", "--train.ckpt_every=1", "--train.keep_last=2", *tracking_args
    )
    return [sys.executable, "-m", "pretrain.train", "--config", "tiny-cpu", *overrides]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(cmd: list[str], log_path: Path) -> tuple[subprocess.Popen, float, Any]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("w")
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, t0, handle


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def log_events(path: Path, t0: float) -> list[tuple[float, str]]:
    """(seconds after launch, message) of every rank-0 log line of the project's logger."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if m:
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((when - t0, line[m.end() :]))
    return events


@dataclass(frozen=True, slots=True)
class Timings:
    """Phase timings of the reference run, in seconds: what kill delays are drawn from."""

    wall_s: float
    startup_s: float
    tracking_s: float
    step_s: float
    finalize_s: float


def reference_timings(events: list[tuple[float, str]], steps: int, wall_s: float) -> Timings:
    """Launch to the trainer's summary line; from there to the first step (resume, tracking store); one step
    with its checkpoint; the final checkpoint to exit (evaluation, export, artifacts)."""
    ckpts = [t for t, msg in events if _CKPT_LINE.search(msg)]
    model_at = next((t for t, msg in events if _MODEL_LINE in msg), None)
    if len(ckpts) != steps or model_at is None:
        raise RuntimeError(f"reference log holds {len(ckpts)} checkpoint lines (expected {steps}) or no summary line")
    # The median: a loaded machine stretches some steps, and a loop kill timed by a stretched step
    # lets a fast start train through to the end.
    step_s = statistics.median([b - a for a, b in itertools.pairwise(ckpts)])
    loop_start = max(model_at, ckpts[0] - step_s)
    return Timings(wall_s, model_at, loop_start - model_at, step_s, wall_s - ckpts[-1])


def temporaries(out_dir: Path) -> set[str]:
    """Temporary files and directories (``.tmp-*``, ``.old-*``, ``*.tmp``) anywhere under out_dir, relative."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(out_dir):
        for name in [*dirnames, *filenames]:
            if name.startswith((".tmp-", ".old-")) or name.endswith(".tmp"):
                found.add((Path(dirpath) / name).relative_to(out_dir).as_posix())
        # A temporary directory counts once, not with its content.
        dirnames[:] = [d for d in dirnames if not d.startswith((".tmp-", ".old-"))]
    return found


def landed_phase(log_path: Path, steps: int, new_temps: set[str], newest: int | None, latest: str | None) -> str:
    """Where a kill landed: the writer whose temporary it left, else the last thing the start logged."""
    names = [Path(t).name for t in new_temps]
    if any(n.startswith((".tmp-step_", ".old-step_", ".latest.")) for n in names):
        return "checkpoint write"
    if newest is not None and latest != tag_for(newest):
        return "checkpoint write (tag renamed, `latest` not yet moved)"
    if any(n.startswith((".tmp-export", ".old-export")) for n in names):
        return "export write"
    if any(t.startswith("feature_cache/") for t in new_temps):
        return "feature-cache write"
    raw = log_path.read_text(errors="replace").splitlines()
    if raw and "mlflow.store.db.utils" in raw[-1]:
        # MLflow's own last words: creating and migrating a fresh SQLite store (or just after).
        return "MLflow store creation"
    lines = [msg for _, msg in log_events(log_path, 0.0)]
    model_at = next((i for i, msg in enumerate(lines) if _MODEL_LINE in msg), None)
    if model_at is None:
        if lines and any(f"pretrain.data: {what}" in lines[-1] for what in ("building", "encoding")):
            return "feature encoding"
        return "start-up"
    resumed = [int(m.group(1)) for msg in lines if (m := _RESUMED_LINE.search(msg))]
    ckpt_steps = [int(m.group(1)) for msg in lines if (m := _CKPT_LINE.search(msg))]
    # Evaluation builds an untrained model: its core's log line follows the trainer's summary line.
    evaluating = any("pretrain.model.cores: built" in msg for msg in lines[model_at + 1 :])
    if steps in ckpt_steps or evaluating:
        return "final eval/export"
    if ckpt_steps:
        return "loop"
    return "resume/tracking set-up" if not resumed or resumed[-1] < steps else "tracking set-up (run complete)"


def resume_line(log_path: Path) -> str:
    return next((msg for _, msg in log_events(log_path, 0.0) if "resuming from" in msg), "")


def latest_pointer(run_dir: Path) -> str | None:
    try:
        return (checkpoint_dir(run_dir) / "latest").read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def newest_step(run_dir: Path) -> int | None:
    tags = list_checkpoints(checkpoint_dir(run_dir))
    return int(tags[-1].name.removeprefix("step_")) if tags else None


def compare_exports(reference: Path, candidate: Path) -> dict[str, Any]:
    """Every tensor torch.equal (same names and dtypes) and the same config.json step."""
    out: dict[str, Any] = {"identical": False, "tensors": 0, "differing": [], "error": ""}
    try:
        ref, got = load_file(reference / "model.safetensors"), load_file(candidate / "model.safetensors")
        ref_step = json.loads((reference / "config.json").read_text())["step"]
        got_step = json.loads((candidate / "config.json").read_text())["step"]
    except (OSError, ValueError, KeyError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
        return out
    out["reference_step"], out["step"] = ref_step, got_step
    out["differing"] = sorted(
        name
        for name in ref.keys() | got.keys()
        if name not in ref
        or name not in got
        or ref[name].dtype != got[name].dtype
        or not torch.equal(ref[name], got[name])
    )
    out["tensors"] = len(ref)
    out["identical"] = not out["differing"] and ref_step == got_step
    return out


def verify_all(run_dir: Path) -> list[dict[str, str]]:
    results = []
    for tag in sorted(checkpoint_dir(run_dir).glob("step_*")):
        error = ""
        try:
            verify_checkpoint(tag)
            if not (tag / MANIFEST_FILE).is_file():
                error = f"no {MANIFEST_FILE}"
        except CheckpointError as err:
            error = str(err)
        results.append({"tag": tag.name, "error": error})
    return results


def checkpoint_extras(run_dir: Path) -> list[str]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not ((p.name.startswith("step_") and p.is_dir()) or (p.name == "latest" and p.is_file()))
    )


def mlflow_statuses(db: Path) -> dict[str, int]:
    """MLflow runs in the store by status (informational); empty when the store cannot be read."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
    except sqlite3.Error:
        return {}


def run_reference(out: Path, steps: int, tracking: bool) -> Timings:
    log_path = out / "logs" / "reference.log"
    proc, t0, handle = launch(train_command(out / "reference", steps, tracking), log_path)
    with handle:
        rc = proc.wait()
    wall_s = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}):\n{tail(log_path)}")
    return reference_timings(log_events(log_path, t0), steps, wall_s)


@dataclass(frozen=True, slots=True)
class KillPlan:
    """When to kill one start: ``delay_s`` after its trigger fires (None: after launch)."""

    target: str
    trigger: re.Pattern[str] | None
    trigger_text: str
    delay_s: float
    watch: str = "log"
    """Where ``trigger`` is matched: "log" (the start's log lines) or "checkpoints" (new entry names there)."""
    nth: int = 1
    """The match that fires the trigger."""


def plan_kill(rng: random.Random, timings: Timings, steps: int, resume_step: int) -> KillPlan:
    """A seeded kill point in one of the phases, timed from this start's own log or checkpoint writes.

    Draws the same number of values whatever the outcome, so a seed gives the same sequence of plans.
    """
    phase, ahead, u = rng.choice(PHASES), rng.randint(1, 3), rng.random()
    # Until the last step the finalize phase is out of reach without letting the loop run through
    # uninterrupted: those kills go to the loop; with nothing left to train, loop kills go to finalize.
    if phase == "finalize" and resume_step < steps - 1:
        phase = "loop"
    elif (phase == "loop" and resume_step >= steps - 1) or (phase == "checkpoint write" and resume_step >= steps):
        phase = "finalize"
    if phase == "start-up":
        return KillPlan(phase, None, "launch", u * timings.startup_s)
    if phase == "tracking set-up":
        return KillPlan(phase, re.compile(re.escape(_MODEL_LINE)), "summary line", u * timings.tracking_s)
    if phase == "loop":
        # Soon after a checkpoint of this start: a few kills per run land in the loop before it finishes.
        step = min(resume_step + ahead, steps - 1)
        pattern = re.compile(rf"checkpoint \S*/step_0*{step}\s*$")
        return KillPlan(phase, pattern, f"step_{step} written", u * timings.step_s)
    if phase == "checkpoint write":
        # A write is a fraction of a step and logs nothing when it begins: watch for its temp directory.
        step = min(resume_step + ahead, steps)
        pattern = re.compile(rf"^\.tmp-step_0*{step}-")
        return KillPlan(phase, pattern, f".tmp-step_{step}-* appears", u * timings.step_s / 2, watch="checkpoints")
    delay_s = u * KILL_WINDOW_FACTOR * timings.finalize_s
    if resume_step < steps:
        pattern = re.compile(rf"checkpoint \S*/step_0*{steps}\s*$")
        return KillPlan(phase, pattern, f"step_{steps} written", delay_s)
    # A finished run resumed: evaluation builds an untrained model, the second core built by this start.
    return KillPlan(phase, re.compile(r"pretrain\.model\.cores: built"), "2nd core built", delay_s, nth=2)


def _wait_for_checkpoint_entry(proc: subprocess.Popen, root: Path, pattern: re.Pattern[str]) -> bool:
    before = {p.name for p in root.iterdir()} if root.is_dir() else set()
    while proc.poll() is None:
        names = {p.name for p in root.iterdir()} if root.is_dir() else set()
        if any(pattern.search(name) for name in names - before):
            return True
        time.sleep(0.001)
    return False


def _wait_for_log_line(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern[str], nth: int) -> bool:
    pending, seen = "", 0
    with log_path.open(errors="replace") as reader:
        while proc.poll() is None:
            pending += reader.read()
            *lines, pending = pending.split("\n")
            seen += sum(1 for line in lines if pattern.search(line))
            if seen >= nth:
                return True
            time.sleep(0.005)
    return False


def wait_then_kill(proc: subprocess.Popen, log_path: Path, run_dir: Path, plan: KillPlan) -> float | None:
    """SIGKILL the start's process group ``plan.delay_s`` after its trigger; the kill's time, or None.

    None when the start exited before the trigger or the deadline.
    """
    if plan.trigger is not None:
        if plan.watch == "checkpoints":
            seen = _wait_for_checkpoint_entry(proc, checkpoint_dir(run_dir), plan.trigger)
        else:
            seen = _wait_for_log_line(proc, log_path, plan.trigger, plan.nth)
        if not seen:
            return None
    t_trigger = time.time()
    try:
        proc.wait(timeout=max(0.0, t_trigger + plan.delay_s - time.time()))
        return None
    except subprocess.TimeoutExpired:
        pass
    t_kill = time.time()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return t_kill


def run_killed(out: Path, steps: int, kills: int, timings: Timings, rng: random.Random, tracking: bool) -> list[Start]:
    run_out = out / "killed"
    run_dir = run_out / RUN_NAME
    cmd = train_command(run_out, steps, tracking)
    starts: list[Start] = []
    # Bound the attempts: a start that finishes before its kill does not count as one.
    max_starts = 3 * kills + 10
    while sum(s.killed for s in starts) < kills and len(starts) < max_starts:
        plan = plan_kill(rng, timings, steps, newest_step(run_dir) or 0)
        start = Start(len(starts), bool(starts) and starts[-1].killed, plan.target, plan.trigger_text, plan.delay_s)
        starts.append(start)
        before = temporaries(run_out) if run_out.exists() else set()
        log_path = out / "logs" / f"start_{start.index:03d}.log"
        proc, t0, handle = launch(cmd, log_path)
        with handle:
            t_kill = wait_then_kill(proc, log_path, run_dir, plan)
        start.wall_s = time.time() - t0
        start.returncode = proc.returncode
        # Killed only if it was still running: a start that had exited reports its own code.
        start.killed = t_kill is not None and proc.returncode == -signal.SIGKILL
        start.kill_at_s = t_kill - t0 if start.killed else None
        start.log = log_path.relative_to(out).as_posix()
        start.resumed_from = resume_line(log_path)
        new_temps = temporaries(run_out) - before
        start.temporaries = sorted(new_temps)
        start.newest_step, start.latest = newest_step(run_dir), latest_pointer(run_dir)
        if start.killed:
            start.landed = landed_phase(log_path, steps, new_temps, start.newest_step, start.latest)
        elif proc.returncode != 0:
            start.tail = tail(log_path)
            log.error("start %d exited %d on its own:\n%s", start.index, proc.returncode, start.tail)
        log.info(
            "start %d: %s after %.2fs (target %s), newest step %s",
            start.index,
            f"killed in {start.landed}" if start.killed else f"exit {proc.returncode}",
            start.wall_s,
            plan.target,
            start.newest_step,
        )
    # The last start runs to completion; bounded so that a hang is reported, not waited on forever.
    final = Start(len(starts), bool(starts) and starts[-1].killed, "complete", "-", None)
    starts.append(final)
    log_path = out / "logs" / f"start_{final.index:03d}.log"
    proc, t0, handle = launch(cmd, log_path)
    with handle:
        try:
            proc.wait(timeout=10 * timings.wall_s + 120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    final.wall_s, final.returncode = time.time() - t0, proc.returncode
    final.log = log_path.relative_to(out).as_posix()
    final.resumed_from = resume_line(log_path)
    final.newest_step, final.latest = newest_step(run_dir), latest_pointer(run_dir)
    if proc.returncode != 0:
        final.tail = tail(log_path)
        log.error("final start exited %d:\n%s", proc.returncode, final.tail)
    return starts


def summarize(out: Path, starts: list[Start], timings: Timings, killed_wall_s: float, args) -> dict[str, Any]:
    run_dir = out / "killed" / RUN_NAME
    export = compare_exports(out / "reference" / RUN_NAME / "export", run_dir / "export")
    checkpoints = verify_all(run_dir)
    beside_export = sorted(p.name for p in run_dir.glob(".tmp-*")) + sorted(p.name for p in run_dir.glob(".old-*"))
    other_temps = sorted(
        t
        for t in temporaries(out / "killed")
        if not t.startswith(f"{RUN_NAME}/checkpoints/") and t.removeprefix(f"{RUN_NAME}/") not in beside_export
    )
    failed = [s for s in starts if not s.killed and s.returncode != 0]
    kills = [s for s in starts if s.killed]
    landed: dict[str, int] = {}
    for s in kills:
        landed[s.landed] = landed.get(s.landed, 0) + 1
    summary = {
        "command": f"python -m benchmarks.kill_resume --kills {args.kills} --out {args.out} --seed {args.seed}"
        + f" --steps {args.steps}"
        + ("" if args.tracking else " --no-tracking"),
        "train_command": " ".join(train_command(out / "killed", args.steps, args.tracking)[1:]),
        "tracking": args.tracking,
        "steps": args.steps,
        "seed": args.seed,
        "reference_wall_s": round(timings.wall_s, 2),
        "reference_timings_s": {k: round(v, 3) for k, v in asdict(timings).items()},
        "killed_run_wall_s": round(killed_wall_s, 2),
        "starts": len(starts),
        "kills": len(kills),
        "resumes": sum(s.resume for s in starts),
        "failed_resumes": len(failed),
        "kills_by_phase": landed,
        "final_start_returncode": starts[-1].returncode,
        "export": export,
        "checkpoints": checkpoints,
        "checkpoint_dir_leftovers": checkpoint_extras(run_dir),
        "export_side_leftovers": beside_export,
        "other_temporaries": other_temps,
        "mlflow_runs_by_status": mlflow_statuses(out / "killed" / "mlflow.db"),
        "start_log": [asdict(s) for s in starts],
    }
    summary["ok"] = (
        summary["kills"] == args.kills
        and not failed
        and starts[-1].returncode == 0
        and export["identical"]
        and bool(checkpoints)
        and not any(c["error"] for c in checkpoints)
        and not summary["checkpoint_dir_leftovers"]
        and not beside_export
        and not other_temps
    )
    return summary


def kill_table(starts: list[Start]) -> str:
    rows = [
        "| kill | start | target | trigger | delay s | killed at s | landed in | newest step_* after | `latest` "
        "| temporaries the kill left |",
        "|---:|---:|---|---|---:|---:|---|---:|---|---|",
    ]
    for n, s in enumerate((s for s in starts if s.killed), 1):
        temps = ", ".join(f"`{t}`" for t in s.temporaries) or "-"
        rows.append(
            f"| {n} | {s.index} | {s.target} | {s.trigger} | {s.delay_s:.2f} | {s.kill_at_s:.2f} | {s.landed} "
            f"| {s.newest_step or '-'} "
            f"| {s.latest or '-'} | {temps} |"
        )
    return "\n".join(rows)


def summary_table(summary: dict[str, Any]) -> str:
    export = summary["export"]
    bad_ckpts = [c for c in summary["checkpoints"] if c["error"]]
    phases = ", ".join(f"{k} {v}" for k, v in sorted(summary["kills_by_phase"].items()))

    def mark(ok: bool) -> str:
        return "ok" if ok else "FAILED"

    export_value = (
        f"{export['tensors'] - len(export['differing'])}/{export['tensors']} tensors equal, "
        f"step {export.get('step')} vs {export.get('reference_step')}"
        if not export["error"]
        else export["error"]
    )
    rows = [
        ("reference wall time", f"{summary['reference_wall_s']:.1f} s", ""),
        ("killed run wall time (all starts)", f"{summary['killed_run_wall_s']:.1f} s", ""),
        ("kills (SIGKILL while running)", str(summary["kills"]), ""),
        ("kills by phase", phases or "-", ""),
        ("resumes (starts after a kill)", str(summary["resumes"]), ""),
        (
            "failed resumes (non-zero exit on their own)",
            str(summary["failed_resumes"]),
            mark(summary["failed_resumes"] == 0),
        ),
        ("final start exit code", str(summary["final_start_returncode"]), mark(summary["final_start_returncode"] == 0)),
        ("export bit-identical to reference", export_value, mark(export["identical"])),
        (
            "checkpoints left that verify",
            f"{len(summary['checkpoints']) - len(bad_ckpts)}/{len(summary['checkpoints'])}",
            mark(bool(summary["checkpoints"]) and not bad_ckpts),
        ),
        (
            "leftovers in checkpoints/ (not step_* or latest)",
            str(len(summary["checkpoint_dir_leftovers"])),
            mark(not summary["checkpoint_dir_leftovers"]),
        ),
        (
            "leftover .tmp-*/.old-* beside the export",
            str(len(summary["export_side_leftovers"])),
            mark(not summary["export_side_leftovers"]),
        ),
        (
            "other temporaries in the out dir",
            str(len(summary["other_temporaries"])),
            mark(not summary["other_temporaries"]),
        ),
        (
            "MLflow runs by status (info)",
            ", ".join(f"{k} {v}" for k, v in summary["mlflow_runs_by_status"].items()) or "-",
            "",
        ),
    ]
    lines = ["| figure | value | check |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill_resume", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to land before the last start")
    parser.add_argument("--out", type=Path, required=True, help="new directory for both runs, logs and the JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill-delay RNG")
    parser.add_argument("--steps", type=int, default=20, help="train.steps of both runs")
    parser.add_argument(
        "--no-tracking",
        dest="tracking",
        action="store_false",
        help="diagnostic: MLflow off, to tell tracking-store failures from checkpoint and export ones",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out: Path = args.out
    if (out / "reference").exists() or (out / "killed").exists():
        print(f"error: {out} already holds a harness run; give a new --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    log.info("reference run (%d steps)", args.steps)
    try:
        timings = run_reference(out, args.steps, args.tracking)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("reference: %s", timings)
    t0 = time.time()
    starts = run_killed(out, args.steps, args.kills, timings, random.Random(args.seed), args.tracking)
    summary = summarize(out, starts, timings, time.time() - t0, args)
    (out / "kill_resume.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(kill_table(starts))
    print()
    print(summary_table(summary))
    failed = [s for s in starts if not s.killed and s.returncode != 0]
    if failed:
        # The first in full; the rest by their last line (one cause usually fails every later start).
        print(f"\nstart {failed[0].index} exited {failed[0].returncode} on its own; its output ends:\n{failed[0].tail}")
        for s in failed[1:]:
            last = s.tail.splitlines()[-1] if s.tail else ""
            print(f"start {s.index} exited {s.returncode}: {last}")
    print(f"\n{'all checks passed' if summary['ok'] else 'FAILED'}; details in {out / 'kill_resume.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
