"""Hardening of what medkd writes and reads (issue 24, points 3, 6, 7, 9, 10 and 11): one writer per output and
run folder, unique staging names, a full disk said in one sentence with nothing answered lost, ids within int64,
corrupt cache lines set aside with file and line, NUL bytes named, duplicate keys in a submission refused, and one
rule for relative paths on the command line. Against the fault server, a real tmpfs where root may mount one, and
a fault-injecting writer."""
import contextlib
import errno
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch.records import main as records_main
from launch.submission import main as submission_main
from launch.teacher import main as teacher_main
from prep.jsonio import JsonlAppender, read_appended, save_splits, write_dir_atomic
from prep.locks import FolderInUse, folder_lock
from prep.records import read_cases
from prep.stages.api_stage import EXIT_DISK_FULL, retry_status
from prep.testing.fault_server import FaultServer
from tests.conftest import REPO_ROOT, SAMPLE_CASES
from tests.test_teacher import SUBPROCESS_ENV, assert_exactly_once, rows, summary, teacher_args, write_cases

SAMPLE_IDS = [case.id for case in read_cases(SAMPLE_CASES).cases]
IN_USE = re.compile(r"is in use by another medkd run \(pid (\d+), since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it "
                    r"or choose another --out")


def _background(target, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


# ---- 3. one writer per folder ---------------------------------------------------------------------------------

def test_a_second_teacher_run_into_the_same_out_is_refused_and_no_request_is_paid_twice(tmp_path, capsys):
    """Two runs into one --out against one server: the second (and a --fresh one) is refused at once, exit 2, in
    one sentence naming the holder; the first finishes with every case once and nothing archived."""
    out = tmp_path / "teacher"
    with FaultServer(latency_s=0.25) as server:
        args = teacher_args(out, server.base_url, server.model, "--set", "client.concurrency=2")
        first, status = _background(teacher_main, args)
        assert server.wait_until(lambda counts: counts["received"] > 0, 30), "the first run never asked"
        capsys.readouterr()
        assert teacher_main(args) == 2
        assert teacher_main(args + ["--fresh"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and all(line.startswith(f"error: {out.absolute()} is in use") for line in err), err
        assert all(int(IN_USE.search(line).group(1)) == os.getpid() for line in err), err
        first.join(60)
        assert status == [0]
        assert server.received == len(SAMPLE_IDS)                     # every case asked once, by the first run only
    assert_exactly_once(out, SAMPLE_IDS)
    assert not list(out.glob("cache.jsonl.*.bak")) and summary(out)["items_asked"] == len(SAMPLE_IDS)
    assert "in use" not in (out / "teacher.log").read_text(encoding="utf-8")   # the refused runs wrote nothing there


def test_a_pipeline_on_a_run_folder_in_use_is_refused_before_its_preflight(tmp_path, capsys):
    from launch.pipeline import main as pipeline_main
    from tests.test_pipeline import write_recipe

    recipe = write_recipe(tmp_path, lambda r: None)
    with folder_lock(tmp_path / "run"):
        assert pipeline_main(["--config", str(recipe), "--until", "teacher"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[pipeline] error: {tmp_path / 'run'} is in use by another medkd run (pid {os.getpid()}, "), err
    assert "choose another run folder" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "logs").exists()                     # no preflight, no step, no log


def test_a_lock_is_held_by_one_holder_at_a_time_and_freed_on_exit(tmp_path):
    with folder_lock(tmp_path / "out") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUse, match=rf"pid {os.getpid()}, since "), folder_lock(tmp_path / "out"):
            pass
    with folder_lock(tmp_path / "out"):                                 # released on leaving the block
        pass


HOLD = ("import sys, time\nfrom prep.locks import folder_lock\nwith folder_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


@pytest.mark.integration
def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    """The kernel frees a flock with its process: a SIGKILLed holder leaves no lock to delete by hand."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=rf"pid {holder.pid}, since"), folder_lock(tmp_path / "out"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    with folder_lock(tmp_path / "out"):
        pass


@pytest.mark.integration
def test_two_teacher_processes_one_out_the_second_refused_then_resumes_after_a_sigkill(tmp_path):
    """Real processes: the second is refused (exit 2, the holder's pid) while the first runs; the first is
    SIGKILLed; the same second command then takes the folder and finishes every case exactly once."""
    cases, out = write_cases(tmp_path / "cases.jsonl", 24, first_id=7000), tmp_path / "teacher"
    with FaultServer(latency_s=0.3) as server:
        command = [sys.executable, "-m", "launch.teacher",
                   *teacher_args(out, server.base_url, server.model, "--set", "client.concurrency=2", cases=cases)]
        first = subprocess.Popen(command, env=SUBPROCESS_ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            assert server.wait_until(lambda counts: counts["received"] > 2, 60), "the first run never asked"
            second = subprocess.run(command, env=SUBPROCESS_ENV, cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 2, second.stderr
            assert int(IN_USE.search(second.stderr).group(1)) == first.pid
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        paid, cached = server.received, len(read_appended(out / "cache.jsonl"))
        again = subprocess.run(command, env=SUBPROCESS_ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert server.received - paid == 24 - cached                  # the rerun asks for exactly what is missing
    assert_exactly_once(out, list(range(7000, 7024)))


def _save_many(folder: str, tag: int, times: int) -> None:
    from datasets import Features, Value

    for i in range(times):
        save_splits({"train": [{"id": tag * 100 + i}], "validation": []}, Features({"id": Value("int64")}), folder)


def test_two_processes_saving_the_same_dataset_do_not_collide(tmp_path):
    import datasets  # noqa: F401  (imported before the fork, so each child starts at once)

    folder = tmp_path / "sft" / "dataset"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_save_many, args=(str(folder), tag, 4)) for tag in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    from datasets import load_from_disk

    saved = load_from_disk(str(folder))
    assert saved["train"][0]["id"] in (103, 203) and saved["validation"].num_rows == 0
    assert sorted(path.name for path in folder.parent.iterdir()) == ["dataset"]   # no staging or old copy left


def test_write_dir_atomic_from_many_threads_publishes_whole_folders_and_clears_an_abandoned_staging(tmp_path):
    folder = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".out.tmp-{dead.pid}-0badc0de"          # what a killed process left behind
    (abandoned / "half").mkdir(parents=True)

    def write(tag: int):
        def fill(staging: Path) -> None:
            staging.mkdir()
            for name in ("a", "b", "c"):
                (staging / name).write_text(str(tag))
                time.sleep(0.002)
        for _ in range(10):
            write_dir_atomic(folder, fill)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    contents = {(folder / name).read_text() for name in ("a", "b", "c")}
    assert len(contents) == 1                                            # one writer's whole folder, never a mix
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


# ---- 6. a full disk --------------------------------------------------------------------------------------------

def test_too_little_free_space_is_refused_before_the_first_request(fault_server, tmp_path, capsys, monkeypatch):
    import prep.stages.api_stage as api_stage

    monkeypatch.setattr(api_stage, "free_gib", lambda path: 40 * 1024 / 2**30)         # 40 KB free
    out = tmp_path / "teacher"
    assert teacher_main(teacher_args(out, fault_server.base_url, fault_server.model)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: not enough disk space at {out}: 0.0 MB free, and this run's outputs need about "), err
    assert "(12 requests x about 5 KB each, a rough estimate: 12 bytes per sampling.max_tokens token" in err
    assert err.endswith("; free space or choose another --out\n") and err.count("\n") == 1
    assert fault_server.received == 0 and fault_server.models_requests == 0          # nothing asked, nothing paid
    assert "not enough disk space" in (out / "teacher.log").read_text(encoding="utf-8")


class _FullAfter:
    """A file handle whose disk fills after ROWS whole lines: the next line is half written, then ENOSPC."""

    def __init__(self, handle, rows: int):
        self.handle, self.rows = handle, rows

    def write(self, text: str) -> int:
        if self.rows == 0:
            self.handle.write(text[:len(text) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.rows -= 1
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_disk_that_fills_mid_run_is_one_sentence_exit_3_and_the_rerun_loses_nothing(fault_server, tmp_path,
                                                                                        capsys, monkeypatch):
    out = tmp_path / "teacher"
    original = JsonlAppender.__init__

    def filling(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.handle = _FullAfter(self.handle, rows=3)

    monkeypatch.setattr(JsonlAppender, "__init__", filling)
    args = teacher_args(out, fault_server.base_url, fault_server.model, "--set", "client.concurrency=1")
    assert teacher_main(args) == EXIT_DISK_FULL == 3
    sentence = (f"disk full at {out / 'cache.jsonl'}; free space and run the same command again: nothing answered "
                f"is lost")
    assert capsys.readouterr().err == f"error: {sentence}\n"
    assert sentence in (out / "teacher.log").read_text(encoding="utf-8")
    data = (out / "cache.jsonl").read_bytes()
    assert data.count(b"\n") == 3 and not data.endswith(b"\n")        # three rows, then half of the refused one
    paid = fault_server.received

    monkeypatch.setattr(JsonlAppender, "__init__", original)                           # space freed
    assert teacher_main(args) == 0
    assert fault_server.received - paid == len(SAMPLE_IDS) - 3        # the 3 cached rows kept; the rest asked once
    assert_exactly_once(out, SAMPLE_IDS)


def test_only_this_machines_full_disk_counts_not_a_message_quoting_one():
    from prep.api.settings import ClientError
    from prep.jsonio import DiskFull, disk_full_at, is_disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/cache.jsonl")
        except OSError as err:
            raise RuntimeError("writing the dataset failed") from err
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped) and disk_full_at(wrapped, "/data/out").path == Path("/data/out/cache.jsonl")
    assert is_disk_full(OSError("[errno 28] No space left on device"))        # pyarrow's wording, no errno set
    assert not is_disk_full(ClientError("3 teacher in a row failed (last: HTTP 500: No space left on device)"))
    assert str(DiskFull("/x")) == "disk full at /x; free space and run the same command again: nothing answered is lost"


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the fault-injecting "
                    f"writer test covers ENOSPC")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_real_full_disk_tmpfs_refuses_first_then_fills_mid_run_and_loses_nothing(fault_server, tmp_path, capsys):
    """A 64 KB tmpfs: refused before any request (the run needs ~65 KB). With 256 KB and a filler leaving a little
    more than the estimate, the disk fills while writing: exit 3 naming the file; with the filler gone, the same
    command finishes without asking again what was cached."""
    disk = tmp_path / "disk"
    with _tmpfs(disk, "64k"):
        assert teacher_main(teacher_args(disk / "teacher", fault_server.base_url, fault_server.model)) == 2
        assert "error: not enough disk space at" in capsys.readouterr().err and fault_server.received == 0
    with _tmpfs(disk, "256k"):
        out = disk / "teacher"
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        # 68 KB left: the lock and the log take 8 KB, the estimate (12 x 4.5 KB at max_tokens 40) passes, the
        # outputs (about 80 KB in 4 KB pages) do not fit.
        filler.write_bytes(bytes(free - 68 * 1024))
        args = teacher_args(out, fault_server.base_url, fault_server.model, "--set", "client.concurrency=2",
                            "--set", "sampling.max_tokens=40")
        assert teacher_main(args) == 3
        err = capsys.readouterr().err
        assert re.fullmatch(rf"error: disk full at {re.escape(str(out))}\S*; free space and run the same command "
                            r"again: nothing answered is lost\n", err), err
        cached = len(read_appended(out / "cache.jsonl"))
        paid = fault_server.received
        filler.unlink()
        assert teacher_main(args) == 0, capsys.readouterr().err
        assert fault_server.received - paid == len(SAMPLE_IDS) - cached     # what was cached is never asked again
        assert_exactly_once(out, SAMPLE_IDS)


# ---- 7. ids within int64 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", [2**63, -2**63 - 1, 10**30])
def test_an_id_outside_int64_is_refused_by_the_reader_and_before_any_request(case_id, fault_server, tmp_path, capsys):
    cases = tmp_path / "cases.jsonl"
    cases.write_text(f'{{"id": 1, "feature_content": "性别: 女"}}\n{{"id": {case_id}, "feature_content": "性别: 男"}}\n',
                     encoding="utf-8")
    assert records_main([str(cases), "--no-tokens"]) == 2
    expected = f"{cases}:2: field 'id': {case_id} is outside the 64-bit integer range the datasets store"
    assert capsys.readouterr().err.startswith(expected)
    assert teacher_main(teacher_args(tmp_path / "out", fault_server.base_url, fault_server.model, cases=cases)) == 2
    assert capsys.readouterr().err.startswith(f"error: {expected}")
    assert fault_server.received == 0 and fault_server.models_requests == 0


def test_the_int64_bounds_themselves_are_ids(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text(f'{{"id": {2**63 - 1}, "feature_content": "a"}}\n{{"id": {-2**63}, "feature_content": "b"}}\n',
                     encoding="utf-8")
    assert [case.id for case in read_cases(cases).cases] == [2**63 - 1, -2**63]


# ---- 9. messages -----------------------------------------------------------------------------------------------

def test_a_cache_line_cut_inside_a_character_is_set_aside_and_only_its_case_asked_again(fault_server, tmp_path,
                                                                                         capsys):
    out = tmp_path / "teacher"
    args = teacher_args(out, fault_server.base_url, fault_server.model, "--limit", "4")
    assert teacher_main(args) == 0 and fault_server.received == 4
    cache = out / "cache.jsonl"
    lines = cache.read_bytes().split(b"\n")
    cut = next(i for i, byte in enumerate(lines[1]) if byte >= 0xE0)   # the first byte of a 3-byte character
    lines[1] = lines[1][:cut + 1]                                       # cut inside it, the line's newline kept
    cache.write_bytes(b"\n".join(lines))
    good = [lines[0], lines[2], lines[3]]
    capsys.readouterr()
    assert teacher_main(args) == 0
    err = capsys.readouterr().err
    assert re.search(rf"warning: {re.escape(str(cache))}:2: corrupt line \(not valid UTF-8 at byte {cut} of the line "
                     rf".*\) moved to {re.escape(str(out / 'cache.corrupt.jsonl'))}; every other row is kept", err), err
    assert fault_server.received == 5                                   # only the cut line's case again
    assert cache.read_bytes().split(b"\n")[:3] == good                  # the good rows byte for byte
    (aside,) = rows(out / "cache.corrupt.jsonl")
    assert aside["line"] == 2 and aside["file"] == str(cache) and "not valid UTF-8" in aside["problem"]
    assert "corrupt line" in (out / "teacher.log").read_text(encoding="utf-8")
    assert_exactly_once(out, SAMPLE_IDS[:4])


def test_read_appended_sets_aside_a_corrupt_middle_line_and_drops_a_torn_tail(tmp_path, capsys):
    log = tmp_path / "cache.jsonl"
    log.write_bytes(b'{"key":"a"}\n{"key": nope}\n[1]\n{"key":"b","v":"\xe7\x97\x85"}\n{"key":"c"')
    assert read_appended(log) == [{"key": "a"}, {"key": "b", "v": "病"}]
    assert log.read_bytes() == b'{"key":"a"}\n{"key":"b","v":"\xe7\x97\x85"}\n'
    assert [(row["line"], row["text"]) for row in rows(tmp_path / "cache.corrupt.jsonl")] == [(2, '{"key": nope}'),
                                                                                               (3, "[1]")]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{log}:2: corrupt line (invalid JSON (Expecting value, column 9))" in err
    assert "(and 1 more corrupt line(s): 3)" in err
    assert read_appended(log) == [{"key": "a"}, {"key": "b", "v": "病"}] and capsys.readouterr().err == ""


def test_exit_1_with_nothing_failed_says_what_is_incomplete(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert retry_status({"failed": 0, "incomplete": 2, "cases": 5}, out) == 1
    err = capsys.readouterr().err
    assert "0 requests failed" not in err and err.count("\n") == 1
    assert err.startswith(f"error: 2 of 5 cases are incomplete (answers they need are not in {out / 'cache.jsonl'}, "
                          f"though no request failed")
    assert err.endswith("run the same command again to ask for them\n")
    assert retry_status({"failed": 1, "incomplete": 1, "cases": 5}, out) == 1
    assert capsys.readouterr().err.startswith("error: 1 requests failed after retries and 1 of 5 cases are incomplete")
    assert retry_status({"failed": 0, "incomplete": 0, "cases": 5}, out) == 0


def test_raw_nul_bytes_in_a_cases_file_are_named_as_such(tmp_path, capsys):
    cases = tmp_path / "cases.jsonl"
    second = '{"id": 2, "feature_content": "性别: 男"}'
    cases.write_bytes(f'{{"id": 1, "feature_content": "性别: 女"}}\n{second}\x00\x00\x00\n\x00\x00\n'.encode())
    assert records_main([str(cases), "--no-tokens"]) == 2
    err = capsys.readouterr().err
    assert f"{cases}:2: holds 3 raw NUL byte(s), the first at column {len(second) + 1}" in err, err
    assert f"{cases}:3: holds 2 raw NUL byte(s), the first at column 1" in err
    assert "Extra data" not in err
    array = tmp_path / "cases.json"
    array.write_bytes(b'[{"id": 1, "feature_content": "a"},\n\x00{"id": 2, "feature_content": "b"}]')
    assert records_main([str(array), "--no-tokens"]) == 2
    assert f"{array}:2: holds 1 raw NUL byte(s), the first at column 1" in capsys.readouterr().err


# ---- 10. a duplicate key in a submission -----------------------------------------------------------------------

def test_a_submission_line_with_a_key_twice_is_refused_naming_key_and_line(tmp_path, capsys):
    lines = [json.dumps({"id": case.id, "reason": "1. 发热", "diseases": "肺炎"}, ensure_ascii=False)
             for case in read_cases(SAMPLE_CASES).cases]
    submission = tmp_path / "submission.jsonl"
    submission.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert submission_main(["check", str(SAMPLE_CASES), str(submission)]) == 0
    lines[2] = lines[2][:-1] + ', "diseases": "胃炎"}'                  # the last value wins in json.loads
    submission.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert submission_main(["check", str(SAMPLE_CASES), str(submission)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{submission}:3: field 'diseases': appears twice in one object"), err
    third = read_cases(SAMPLE_CASES).cases[2].id                        # a refused line answers no case
    assert err.endswith(f"{submission}: 1 input ids have no line: {third}\n{submission}: INVALID (2 problems)\n")

    cases = tmp_path / "cases.jsonl"                                    # a case file is read the same way
    cases.write_text('{"id": 1, "feature_content": "性别: 女", "id": 2}\n', encoding="utf-8")
    assert records_main([str(cases), "--no-tokens"]) == 2
    assert capsys.readouterr().err.startswith(f"{cases}:1: field 'id': appears twice in one object")


# ---- 11. relative paths on the command line: the caller's working directory -----------------------------------

def test_a_relative_input_is_the_callers_for_records_and_teacher_alike(fault_server, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # data/sample_cases.jsonl exists in the repo, not here
    missing = tmp_path / "data" / "sample_cases.jsonl"
    assert records_main(["data/sample_cases.jsonl", "--no-tokens"]) == 2
    assert capsys.readouterr().err == f"{missing}: file not found\n"
    args = teacher_args("out", fault_server.base_url, fault_server.model, cases="data/sample_cases.jsonl")
    assert teacher_main(args) == 2
    assert capsys.readouterr().err == f"error: {missing}: file not found\n"
    assert fault_server.received == 0 and not (REPO_ROOT / "out").exists()

    missing.parent.mkdir()
    write_cases(missing, 2, first_id=900)                               # now it is here: both read this one
    assert records_main(["data/sample_cases.jsonl", "--no-tokens"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2
    assert teacher_main(args) == 0 and fault_server.received == 2
    assert_exactly_once(tmp_path / "out", [900, 901])                 # --out out: under the caller's directory


def test_a_relative_pipeline_out_on_the_command_line_lands_under_the_callers_directory(tmp_path, monkeypatch, capsys):
    from custom_losses.pipeline.run import command_line_paths, run_pipeline

    recipe = REPO_ROOT / "recipes" / "pipeline" / "tiny-cpu.yaml"
    monkeypatch.chdir(tmp_path)
    assert run_pipeline(recipe, ["out=runs/x"], plan_only=True) == tmp_path / "runs" / "x"
    assert command_line_paths(["out=runs/x", "train_cases='my cases.jsonl'", "out=/abs", "stages=[1]"]) == [
        f'out="{tmp_path}/runs/x"', f'train_cases="{tmp_path}/my cases.jsonl"', "out=/abs", "stages=[1]"]
    monkeypatch.chdir(REPO_ROOT)                                        # the README's directory: as before
    assert run_pipeline(recipe, ["out=runs/x"], plan_only=True) == REPO_ROOT / "runs" / "x"
