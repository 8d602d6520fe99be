"""A pipeline step, its content-addressed key, the run/skip decision, and running it with a progress line.

A step's key is a digest of everything that determines its output (make's, DVC's and Bazel's rule):
its command line, its composed stage recipe (after overlays and `--set`), the content of every file it
reads from outside the run folder (case files, prompt files, lexicon, a local base model: found by
walking the composed recipe, prep.digests.recipe_inputs), the keys of the upstream steps whose outputs
it reads, and the code that runs it (every first-party module its command imports, and the version
pins). A step runs when its key differs from the one in its stamp, when an upstream step runs, or when
its outputs are missing or invalid; the reason is kept, so `--plan` can say which input changed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prep.api.process import new_session_dying_with_parent
from prep.config import compose
from prep.digests import (
    DigestCache,
    as_recorded,
    code_parts,
    read_record,
    recipe_inputs,
    sha256_json,
    why_not_current,
    write_record,
)
from prep.jsonio import InputError
from prep.paths import REPO_ROOT
from prep.testing.tiny_model import resolve_model
from prep.tokenizer import CHAT_TEMPLATE_PATH

PYTHON = sys.executable
# The one table of the commands the pipeline runs as steps (each a process): a recipe folder's command, and the
# tools between them. A step is a process so that a crash, a timeout or a GPU's memory ends with it.
COMMANDS = {"teacher": "launch.teacher", "softlabels": "launch.softlabels", "sft": "launch.sft",
            "distill": "launch.distill", "predict": "launch.predict", "score": "launch.score",
            "merge": "launch.merge", "onpolicy": "launch.onpolicy", "submission": "launch.submission"}


def command_argv(command: str, *args: str) -> list[str]:
    """`python -m <the command module> ARGS` for COMMAND, a key of COMMANDS."""
    return [PYTHON, "-m", COMMANDS[command], *args]

# Written into a step's command where a path must change with the step's data (Axolotl's tokenised-dataset
# cache); replaced by the digest of the step's inputs and upstream keys when the key is made.
DATA_KEY = "{data_key}"


class PipelineError(RuntimeError):
    """A run that cannot go on; exit_code is the project's code for it (prep.cli): 2 unless a step said otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def step_exit_code(returncode: int) -> int:
    """The pipeline's exit code for a step that exited RETURNCODE: the step's own code where it is one of the
    table's (1 run again, 2 fix the input, 3 free disk); a crash or a signal is 1, since a rerun resumes."""
    return returncode if returncode in (1, 2, 3) else 1


@dataclass(frozen=True)
class StageCommand:
    """One stage command as the pipeline runs it: the recipe, its overlays and its overrides."""

    folder: str                       # its recipes/<folder>/, which names its command and its validator
    recipe: str
    overlays: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    def argv(self, *args: str) -> list[str]:
        flags = [arg for overlay in self.overlays for arg in ("--overlay", overlay)]
        flags += [arg for item in self.overrides for arg in ("--set", item)]
        return command_argv(self.folder, "--config", self.recipe, *args, *flags)

    def composed(self) -> dict:
        return compose(self.recipe, list(self.overlays), list(self.overrides))


@dataclass
class Step:
    name: str
    argv: list[str]                                   # `python -m launch.<command> ...`
    outputs: list[Path]                               # all must exist for the step to count as done
    validate: Callable[[], None] | None = None        # raises when the outputs are not complete and valid
    before: Callable[[], None] | None = None          # cheap local preparation (e.g. write an input file)
    deps: tuple[str, ...] = ()                        # upstream steps whose outputs it reads
    inputs: tuple[Path, ...] = ()                     # files outside the run folder it reads (case files)
    recipe: StageCommand | None = None                    # its stage recipe, composed into the key
    # A training step's flag to discard checkpoints: passed when it last started under another key (an edited
    # recipe, new data), not when it resumes the same key after a crash.
    fresh_flag: str | None = None
    # Its place in the stages' own order (stage one, then stage two), which `--until` counts in; the run order
    # (custom_losses.pipeline.plan.run_order) may bring a step forward to share a server.
    rank: int = 0

    @property
    def module(self) -> str:
        return self.argv[2]


@dataclass
class Decision:
    """Whether STEP runs, and why: `reason` is None when it is up to date."""

    step: Step
    key: str
    parts: dict[str, str]
    reason: str | None

    @property
    def runs(self) -> bool:
        return self.reason is not None

    def line(self, width: int) -> str:
        return f"{self.step.name:<{width}}  {'run' if self.runs else 'skip'}  ({self.reason or 'up to date'})"


# --------------------------------------------------------------------------- keys and decisions

def label(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def step_parts(step: Step, keys: dict[str, str], out: Path, cache: DigestCache,
               limit: int | None = None) -> dict[str, str]:
    """Everything STEP's output depends on, digest by digest; fills in its command's DATA_KEY. LIMIT (a trial's
    --limit N) is a part of every step's, those that read no case file too: a trial's merged model or score table
    is not a full run's."""
    parts = {f"dep:{name}": keys[name] for name in step.deps}
    if limit:
        parts["limit"] = str(limit)
    files = [*step.inputs, CHAT_TEMPLATE_PATH]
    composed = step.recipe.composed() if step.recipe else None
    if composed is not None:
        files += recipe_inputs(composed, exclude=[out], model_folder=resolve_model)
    for path in dict.fromkeys(path.absolute() for path in files):
        parts[f"file:{label(path)}"] = cache.digest(path)
    data_key = sha256_json(parts)[:16]          # what the step reads, before how it is told to read it
    # The run folder's own path is left out (written as $OUT), so a run folder moved or copied elsewhere is
    # still up to date; the interpreter's path is not part of the result either.
    if composed is not None:
        parts["recipe"] = sha256_json(json.loads(json.dumps(composed, default=str).replace(str(out), "$OUT")))
    parts["argv"] = sha256_json([arg.replace(str(out), "$OUT") for arg in step.argv[1:]])
    parts.update(code_parts(step.module, cache))
    step.argv = [arg.replace(DATA_KEY, data_key) for arg in step.argv]
    return parts


def run_reason(step: Step, key: str, parts: dict[str, str], stamps: Path, running: set[str]) -> str | None:
    reason = why_not_current(stamps / f"{step.name}.json", parts)
    if reason is not None:
        return reason
    upstream = [name for name in step.deps if name in running]
    if upstream:
        return f"upstream {upstream[0]} runs"
    missing = [path for path in step.outputs if not path.exists()]
    if missing:
        return f"{label(missing[0])} missing"
    if step.validate:
        try:
            step.validate()
        except (PipelineError, InputError, ValueError) as err:
            return f"outputs invalid: {err}"
    return None


def decide(steps: list[Step], out: Path, stamps: Path, limit: int | None = None) -> list[Decision]:
    """Each step's key and whether it runs, in order (a step after one that runs, and reads from it, runs too);
    LIMIT: a trial's --limit, part of every key."""
    cache = DigestCache(stamps / "digests.json")
    keys: dict[str, str] = {}
    running: set[str] = set()
    decisions = []
    for step in steps:
        parts = step_parts(step, keys, out, cache, limit)
        keys[step.name] = sha256_json(parts)[:16]
        reason = run_reason(step, keys[step.name], parts, stamps, running)
        if reason is not None:
            running.add(step.name)
        decisions.append(Decision(step, keys[step.name], parts, reason))
    if stamps.is_dir():
        cache.save()
    return decisions


def write_stamp(stamps: Path, decision: Decision, seconds: float) -> None:
    write_record(stamps / f"{decision.step.name}.json", decision.parts, done=True, key=decision.key,
                 seconds=round(seconds, 1))


# --------------------------------------------------------------------------- progress

# tqdm's bar as written to a log: "desc:  45%|████▌     | 9/20 [00:10<00:12, 1.1it/s]".
BAR = re.compile(r"([^\r\n|%\[\]{}]*?):?\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)\s*\[")
LOSS = re.compile(r"'loss': '?(-?[\d.]+(?:e-?\d+)?)")


def progress_of(text: str) -> str | None:
    """`sft 9/20 loss 1.234` from the tail of a step's log: its last progress bar and last logged loss."""
    bars = BAR.findall(text)
    if not bars:
        return None
    desc, done, total = bars[-1]
    losses = LOSS.findall(text)
    words = [desc.strip() or "step", f"{done}/{total}"]
    if losses:
        words.append(f"loss {float(losses[-1]):.4g}")
    return " ".join(words)


class ProgressLine:
    """One line per running step: rewritten in place on a terminal, a plain line every INTERVAL_S otherwise."""

    def __init__(self, name: str, interval_s: float, stream: TextIO | None = None) -> None:
        self.name, self.interval_s = name, interval_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_text, self.last_time, self.drawn = None, 0.0, False

    def update(self, text: str | None, elapsed: float) -> None:
        if text is None:
            return
        line = f"[pipeline] {self.name}: {text} ({elapsed:.0f} s)"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.drawn = True
        elif text != self.last_text and time.monotonic() - self.last_time >= self.interval_s:
            self.stream.write(line + "\n")
            self.last_text, self.last_time = text, time.monotonic()
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def tail(path: Path, start: int, size: int = 16384) -> str:
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        handle.seek(max(start, end - size))
        return handle.read().decode("utf-8", errors="replace")


def run_step(step: Step, logs: Path, timeout_s: float, progress_interval_s: float) -> float:
    """Run STEP's command with its output appended to logs/<step>.log, showing its progress; the seconds it took."""
    log_path = logs / f"{step.name}.log"
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(step.argv)}\n")
        log.flush()
        start = log.tell()
        # Own session, so a timeout ends the step's whole process tree.
        process = subprocess.Popen(step.argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=new_session_dying_with_parent)
        line = ProgressLine(step.name, progress_interval_s)
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > timeout_s:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=60)
                    raise PipelineError(f"step {step.name} ran past {timeout_s:.0f} s; see {log_path}", 1)
                line.update(progress_of(tail(log_path, start)), elapsed)
                time.sleep(1.0)
        finally:
            line.close()
    if process.returncode != 0:
        last = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise PipelineError(f"step {step.name} failed (exit {process.returncode}); see {log_path}; last lines:\n{last}",
                            step_exit_code(process.returncode))
    return time.monotonic() - started


def run_decision(decision: Decision, logs: Path, stamps: Path, timeout_s: float, progress_interval_s: float,
                 server_url: str | None = None) -> dict:
    """Run a step that must run (and stamp it), or say it is skipped; its summary row. SERVER_URL: the step's
    server is already running there (custom_losses.pipeline.servers), passed as --server-url, in no key."""
    step = decision.step
    if not decision.runs:
        print(f"[pipeline] {step.name}: up to date, skipped", flush=True)
        return {"step": step.name, "status": "skipped", "seconds": 0.0, "key": decision.key}
    if step.before:
        step.before()
    # The step's record, not done, from its start: a step killed and started again under another identity gets
    # its fresh flag, so it does not resume what the other identity left (a trainer's checkpoints).
    record = stamps / f"{step.name}.json"
    last = read_record(record)
    if step.fresh_flag and last is not None and last.get("identity") != as_recorded(decision.parts):
        step.argv = [*step.argv, step.fresh_flag]
    if server_url:
        step.argv = [*step.argv, "--server-url", server_url]
    write_record(record, decision.parts, done=False, key=decision.key)
    print(f"[pipeline] {step.name}: running ({decision.reason}; log {logs / (step.name + '.log')})", flush=True)
    seconds = run_step(step, logs, timeout_s, progress_interval_s)
    missing = [str(path) for path in step.outputs if not path.exists()]
    if missing:
        raise PipelineError(f"step {step.name} finished without writing {missing[0]}")
    if step.validate:
        step.validate()
    write_stamp(stamps, decision, seconds)
    print(f"[pipeline] {step.name}: finished in {seconds:.0f} s", flush=True)
    return {"step": step.name, "status": "ran", "seconds": round(seconds, 1), "key": decision.key}
