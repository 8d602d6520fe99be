"""launch.pipeline: bad input stops it before any step; each step's content key changes with exactly what
determines its output; SIGKILL inside each step, then the same command finishes with every case exactly
once and a valid submission; on that finished run, `--plan` and real re-runs after an unchanged re-run, an
in-place recipe edit, a prompt change and a switch to a full fine-tune SFT recipe."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from custom_losses.pipeline.plan import build_plan, plan_pipeline, validate_recipe
from custom_losses.pipeline.steps import ProgressLine, progress_of
from prep.answers import Answer, answer_json
from prep.api.cache import load_cache
from prep.digests import read_record
from prep.eval.submission import check_submission
from prep.jsonio import read_appended, read_jsonl
from tests.conftest import REPO_ROOT, SAMPLE_CASES

RECIPES = REPO_ROOT / "recipes"
TINY = RECIPES / "pipeline" / "tiny-cpu.yaml"
ROUND_ONE = ["student-1", "mix-1", "softlabels-1", "distill-1", "predict-round1"]   # the demo's on-policy round


def write_recipe(tmp_path: Path, edit) -> Path:
    recipe = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    recipe["out"] = str(tmp_path / "run")
    edit(recipe)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def run_pipeline(recipe: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The pipeline command on this machine as a CPU machine (no GPU visible, whatever is installed)."""
    return subprocess.run([sys.executable, "-m", "launch.pipeline", "--config", str(recipe), *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def corrupt_cases(tmp_path: Path) -> str:
    lines = SAMPLE_CASES.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3][:40]  # a torn line
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def unknown_teacher_key(tmp_path: Path) -> str:
    teacher = yaml.safe_load((REPO_ROOT / "recipes/teacher/local-tiny-vllm.yaml").read_text(encoding="utf-8"))
    teacher["sampling"]["temprature"] = 0.5
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(teacher), encoding="utf-8")
    return str(path)


def one_case(tmp_path: Path) -> str:
    path = tmp_path / "one.jsonl"
    path.write_text(SAMPLE_CASES.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    return str(path)


def empty_cases(tmp_path: Path) -> str:
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    return str(path)


BAD = {
    "empty case file": (lambda r, t: r.update(test_cases=empty_cases(t)), "empty.jsonl: no cases: the file is empty"),
    "split leaves no training rows": (
        lambda r, t: (r.update(train_cases=one_case(t)), r["stage1"].update(teacher_set=["split.valid_fraction=0.999"])),
        "holds out all 1 case(s), leaving no training rows"),
    "corrupt case line": (lambda r, t: r.update(train_cases=corrupt_cases(t)), r"cases.jsonl:4: invalid JSON"),
    "missing key": (lambda r, t: r["stage1"].pop("teacher"), "key 'stage1.teacher': missing (required)"),
    "wrong type": (lambda r, t: r.update(min_free_disk_gb="lots"), "key 'min_free_disk_gb': expected float, got str"),
    "unknown key": (lambda r, t: r["stage1"].update(teachr="x"), "key 'stage1.teachr': unknown key (did you mean 'stage1.teacher'?)"),
    "unknown key in a stage recipe": (lambda r, t: r["stage1"].update(teacher=unknown_teacher_key(t)),
                                      "key 'sampling.temprature': unknown key (did you mean 'sampling.temperature'?)"),
    "missing stage recipe": (lambda r, t: r["stage2"].update(distill="recipes/distill/nope.yaml"), "recipes/distill/nope.yaml"),
    "bad score setting": (lambda r, t: r["score"].update(set=["fuzzy_threshold=2"]),
                          "fuzzy_threshold must be in (0, 1], got 2"),
    "GPU recipe without a GPU": (lambda r, t: r["stage1"].pop("sft_overlays"), "FAIL cuda: no CUDA GPU visible"),
    "mix out of range": (lambda r, t: r["stage2"].update(on_policy_mix=1.5),
                         "key 'stage2.on_policy_mix': must be in [0, 1], got 1.5"),
    "unknown soft-label answers": (lambda r, t: r["stage2"].update(softlabel_answers="kep"),
                                   "key 'stage2.softlabel_answers': must be kept or fresh, got 'kep'"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", BAD)
def test_bad_input_stops_before_any_step(tmp_path, name):
    edit, message = BAD[name]
    recipe = write_recipe(tmp_path, lambda r: edit(r, tmp_path))
    started = time.monotonic()
    result = run_pipeline(recipe)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # No step started: a step's first act is to open its log under logs/ and its stamp goes to stamps/.
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "stamps").exists()
    assert ": running (log" not in result.stdout
    assert time.monotonic() - started < 90


def test_plan_passes_every_setting_as_the_stage_commands_own_flags(tmp_path):
    recipe = write_recipe(tmp_path, lambda r: r["score"].update(set=["fuzzy_threshold=0.6"]))
    plan = {step.name: step.argv for step in build_plan(validate_recipe(recipe))}
    out = tmp_path / "run"
    # Soft labels and the base model's predictions run behind the teacher, on its server when it serves them alike.
    assert list(plan) == ["teacher", "softlabels", "predict-base", "sft", "merge", "predict-stage1", "distill",
                          "predict-stage2", *ROUND_ONE, "score", "submission"]
    # Recipe and case paths are absolute: the steps run in the repository wherever the pipeline started.
    assert plan["teacher"][1:5] == ["-m", "launch.teacher", "--config", f"{RECIPES}/teacher/local-tiny-vllm.yaml"]
    assert plan["teacher"][-2:] == ["--set", "split.valid_fraction=0.34"]
    sft = plan["sft"]
    assert sft[1:3] == ["-m", "launch.sft"] and "--run" not in sft
    assert sft[sft.index("--overlay") + 1] == f"{RECIPES}/sft/overrides/cpu-tiny.yaml"
    sets = [sft[i + 1] for i, arg in enumerate(sft) if arg == "--set"]
    # Axolotl's tokenised-dataset cache is named by the digest of the data (filled in when the key is made).
    assert sets == [f'output_dir="{out}/stage1/sft"', f'dataset_prepared_path="{out}/stage1/sft/prepared/{{data_key}}"',
                    f'datasets.0.path="{out}/stage1/teacher/sft/train.jsonl"',
                    f'test_datasets.0.path="{out}/stage1/teacher/sft/valid.jsonl"']
    assert plan["merge"][1:] == ["-m", "launch.merge", f"{out}/stage1/sft"]
    distill = plan["distill"]
    assert distill[distill.index("--overlay") + 1] == f"{RECIPES}/distill/overrides/cpu-tiny.yaml"
    assert [distill[i + 1] for i, arg in enumerate(distill) if arg == "--set"] == [
        f'dataset_path="{out}/stage2/softlabels"', f'output_dir="{out}/stage2/distill"',
        f'model_name_or_path="{out}/stage1/merged"']
    score = plan["score"]
    assert score[1:5] == ["-m", "launch.score", "--config", f"{RECIPES}/score/default.yaml"]
    assert score[-2:] == ["--set", "fuzzy_threshold=0.6"]
    assert score[score.index("--names") + 1:score.index("--names") + 5] == ["base", "stage1", "stage2", "round1"]
    assert plan["submission"][1:] == ["-m", "launch.submission", "write", str(SAMPLE_CASES),
                                      f"{out}/stage2/round-1/predict/predictions.jsonl", f"{out}/submission.jsonl"]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_stage_two_scores_the_kept_answers_and_each_on_policy_round_continues_from_the_last(tmp_path):
    recipe = write_recipe(tmp_path, lambda r: r["stage2"].update(on_policy_rounds=2, on_policy_mix=0.5,
                                                                 on_policy_distill_set=["learning_rate=1.0e-3"]))
    steps = {step.name: step for step in build_plan(validate_recipe(recipe))}
    out = tmp_path / "run"
    rounds = [f"{kind}-{index}" for index in (1, 2) for kind in ("student", "mix", "softlabels", "distill")]
    assert list(steps)[7:] == ["predict-stage2", *rounds[:4], "predict-round1", *rounds[4:], "predict-round2",
                               "score", "submission"]
    # Stage two: the soft-label teacher scores what stage one kept, so it follows the teacher step.
    assert flag_values(steps["softlabels"].argv, "--answers") == [f"{out}/stage1/teacher"]
    assert steps["softlabels"].deps == ("teacher",)
    for index, model in ((1, f"{out}/stage2/distill/merged"), (2, f"{out}/stage2/round-1/distill/merged")):
        round_folder = f"{out}/stage2/round-{index}"
        student = steps[f"student-{index}"]
        assert flag_values(student.argv, "--model") == [model] and flag_values(student.argv, "--input") == [
            str(SAMPLE_CASES)]
        assert flag_values(student.argv, "--set")[-1:] == ["sampling.temperature=1.0"]
        mix = steps[f"mix-{index}"].argv
        assert mix[1:3] == ["-m", "launch.onpolicy"] and flag_values(mix, "--mix") == ["0.5"]
        assert flag_values(mix, "--student") == [f"{round_folder}/student/predictions.jsonl"]
        assert flag_values(mix, "--round") == [str(index)]
        assert flag_values(steps[f"softlabels-{index}"].argv, "--answers") == [f"{round_folder}/answers.jsonl"]
        distill = steps[f"distill-{index}"]
        assert flag_values(distill.argv, "--set") == [
            "learning_rate=1.0e-3", f'dataset_path="{round_folder}/softlabels"',
            f'output_dir="{round_folder}/distill"', f'model_name_or_path="{model}"']
        assert distill.deps == (f"softlabels-{index}", "distill" if index == 1 else "distill-1")
        assert flag_values(steps[f"predict-round{index}"].argv, "--model") == [f"{round_folder}/distill/merged"]
    score = steps["score"].argv
    assert score[score.index("--names") + 1:] == ["base", "stage1", "stage2", "round1", "round2"]
    assert [arg for arg in score if arg.startswith("distill-")] == [
        f"distill-1={out}/stage2/round-1/distill", f"distill-2={out}/stage2/round-2/distill"]
    assert steps["submission"].argv[-2] == f"{out}/stage2/round-2/predict/predictions.jsonl"

    fresh = write_recipe(tmp_path, lambda r: r["stage2"].update(softlabel_answers="fresh"))
    steps = {step.name: step for step in build_plan(validate_recipe(fresh))}
    # Fresh samples keep stage one's held-out cases out of stage two's training rows (and its agreement per case).
    assert "--answers" not in steps["softlabels"].argv and steps["softlabels"].deps == ("teacher",)
    assert flag_values(steps["softlabels"].argv, "--split-from") == [f"{out}/stage1/teacher"]


def test_a_student_trained_on_reasoning_traces_is_asked_for_them_and_the_base_model_is_not(tmp_path):
    recipe = write_recipe(tmp_path, lambda r: (r["stage1"]["teacher_set"].append("reasoning=target"),
                                               r["stage2"].update(on_policy_rounds=1)))
    steps = {step.name: step.argv for step in build_plan(validate_recipe(recipe))}
    overlay = str(RECIPES / "predict" / "overrides" / "reasoning.yaml")
    for name in ("predict-stage1", "predict-stage2", "student-1", "predict-round1"):
        assert flag_values(steps[name], "--overlay") == [overlay], name
    assert "--overlay" not in steps["predict-base"]


@pytest.mark.integration
def test_kept_answers_with_a_hosted_chat_api_stop_in_preflight(tmp_path):
    from prep.testing.fault_server import FaultServer

    softlabels = yaml.safe_load((RECIPES / "softlabels" / "local-tiny-vllm.yaml").read_text(encoding="utf-8"))
    with FaultServer() as api:   # a chat API: /completions answers carry no prompt_logprobs
        softlabels["server"] = None
        softlabels["client"].update(base_url=api.base_url, model="fault-model")
        path = tmp_path / "hosted-softlabels.yaml"
        path.write_text(yaml.safe_dump(softlabels, allow_unicode=True), encoding="utf-8")
        recipe = write_recipe(tmp_path, lambda r: r["stage2"].update(softlabels=str(path)))
        result = run_pipeline(recipe)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAIL soft-label teacher endpoint" in result.stderr
    assert "need a vLLM teacher" in result.stderr and "stage2.softlabel_answers: fresh" in result.stderr
    assert not (tmp_path / "run" / "logs").exists()


# --------------------------------------------------------------------------- content keys (no step runs)

def make_editable(tmp_path: Path) -> dict[str, Path]:
    """The tiny pipeline recipe over copies of the inputs a user edits in place: the teacher's prompt file,
    the SFT and distill CPU overlays, the case file."""
    copies = {"user_prompt": REPO_ROOT / "data/prompts/user.txt", "cases": SAMPLE_CASES,
              "sft_overlay": RECIPES / "sft/overrides/cpu-tiny.yaml",
              "distill_overlay": RECIPES / "distill/overrides/cpu-tiny.yaml"}
    paths = {}
    for name, source in copies.items():
        folder = tmp_path / ("overrides" if "overlay" in name else "inputs") / name
        folder.mkdir(parents=True)
        paths[name] = Path(shutil.copy2(source, folder / source.name))

    def edit(recipe: dict) -> None:
        recipe.update(train_cases=str(paths["cases"]), test_cases=str(paths["cases"]))
        recipe["stage1"]["teacher_set"].append(f"prompts.user={paths['user_prompt']}")
        recipe["stage1"]["sft_overlays"] = [str(paths["sft_overlay"])]
        recipe["stage2"]["distill_overlays"] = [str(paths["distill_overlay"])]
    paths["recipe"] = write_recipe(tmp_path, edit)
    return paths


@pytest.fixture
def editable(tmp_path) -> dict[str, Path]:
    return make_editable(tmp_path)


def keys_of(recipe: Path, *overrides: str) -> dict[str, str]:
    return {decision.step.name: decision.key for decision in plan_pipeline(validate_recipe(recipe, overrides=overrides))}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


STAGE_ONE_MODEL_DOWN = {"sft", "merge", "predict-stage1", "distill", "predict-stage2", *ROUND_ONE, "score",
                        "submission"}


def test_a_step_key_changes_with_exactly_what_determines_its_output(editable):
    recipe = editable["recipe"]
    start = keys_of(recipe)
    for path in editable.values():   # touched, same content: nothing to redo
        os.utime(path, (time.time() + 60, time.time() + 60))
    assert keys_of(recipe) == start

    replace_in(editable["sft_overlay"], "learning_rate: 0.005", "learning_rate: 0.004")   # in place, same path
    assert changed(start, keys_of(recipe)) == STAGE_ONE_MODEL_DOWN
    replace_in(editable["sft_overlay"], "learning_rate: 0.004", "learning_rate: 0.005")
    assert keys_of(recipe) == start

    replace_in(editable["distill_overlay"], "learning_rate: 5.0e-3", "learning_rate: 4.0e-3")
    assert changed(start, keys_of(recipe)) == {"distill", "predict-stage2", *ROUND_ONE, "score", "submission"}
    replace_in(editable["distill_overlay"], "learning_rate: 4.0e-3", "learning_rate: 5.0e-3")

    with open(editable["user_prompt"], "a", encoding="utf-8") as prompt:   # the teacher's prompt only
        prompt.write("\n请简洁。\n")
    prompted = keys_of(recipe)
    assert changed(start, prompted) == set(start)   # stage two scores the answers the teacher kept

    # The soft-label teacher's sampling: stage two's soft labels and what reads them, nothing in stage one.
    # (every round's soft labels too: the same recipe scores them).
    assert changed(prompted, keys_of(recipe, "stage2.softlabels_set=[sampling.seed=7]")) == {
        "softlabels", "distill", "predict-stage2", *ROUND_ONE, "score", "submission"}


def test_a_moved_run_folder_keeps_its_keys_and_a_missing_output_reruns_its_step(tmp_path, editable):
    recipe = editable["recipe"]
    assert keys_of(recipe) == keys_of(recipe, f"out={tmp_path / 'elsewhere'}")
    decisions = plan_pipeline(validate_recipe(recipe))
    assert {decision.reason for decision in decisions} == {"not run yet"}


# --------------------------------------------------------------------------- a real run, killed in every step

def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the pipeline and the session of the step it runs: as if the machine lost power."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(child), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


STEPS = ["teacher", "softlabels", "predict-base", "sft", "merge", "predict-stage1", "distill", "predict-stage2",
         *(f"{kind}1" for kind in ("student-", "mix-", "softlabels-", "distill-", "predict-round"))]
# One kill per kind of resume (the API cache, Axolotl's checkpoints, TRL's checkpoints), the last two inside the
# on-policy round, which continues from stage two's model exactly as every later round continues from the one
# before (the plan test above checks the chain); the teacher, predict and the soft-label steps resume through the
# same cache runner (the teacher's own kill test is in test_teacher.py).
KILLED = ["sft", "softlabels-1", "distill-1"]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_point(step: str, out: Path):
    """True once STEP is part-way through its real work (not just starting)."""
    log = out / "logs" / f"{step}.log"
    caches = {"softlabels-1": out / "stage2" / "round-1" / "softlabels"}
    if step in caches:
        return lambda: _lines(caches[step] / "cache.jsonl") >= 1
    return lambda: log.exists() and "'loss'" in log.read_text(errors="replace")


# The shared run (three kills, then the whole pipeline with an on-policy round) is set up inside the first test
# that uses it, and pytest-timeout counts a test's fixtures: above the suite's 900 s default on two loaded cores.
KILLED_RUN_TIMEOUT = pytest.mark.timeout(2700)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    """The tiny pipeline (both stages, an on-policy round mixing half the student's answers) over editable
    inputs, SIGKILLed inside a step of each kind in turn (as if the machine lost power), then run again to the
    end by the same command: shared by the re-run tests below."""
    tmp_path = tmp_path_factory.mktemp("killed")
    paths = make_editable(tmp_path)
    recipe = yaml.safe_load(paths["recipe"].read_text(encoding="utf-8"))
    recipe["stage2"].update(on_policy_rounds=1, on_policy_mix=0.5)
    paths["recipe"].write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "launch.pipeline", "--config", str(paths["recipe"])]
    for step in KILLED:
        with open(tmp_path / f"pipeline-{step}.out", "w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            reached, deadline = kill_point(step, out), time.monotonic() + 900
            while not reached():
                assert process.poll() is None, (tmp_path / f"pipeline-{step}.out").read_text()[-2000:]
                assert time.monotonic() < deadline, f"step {step} never got going"
                time.sleep(0.1)
            _kill_tree(process)
        record = read_record(out / "stamps" / f"{step}.json")
        assert record is None or not record["done"], f"{step} finished before the kill"
    final = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    return {**paths, "out": out, "command": command, "final": final, "tmp": tmp_path}


def ids_in(path: Path) -> list[int]:
    return [row["id"] for row in read_jsonl(path)]


@pytest.mark.slow
@KILLED_RUN_TIMEOUT
def test_sigkill_inside_each_kind_of_step_then_rerun_gives_every_case_exactly_once(killed_run, qwen_tokenizer):
    final, out = killed_run["final"], killed_run["out"]
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    cases = ids_in(SAMPLE_CASES)
    teacher, stage2 = out / "stage1" / "teacher", out / "stage2"
    label_folders = [stage2 / "softlabels", stage2 / "round-1" / "softlabels"]
    for cache in [teacher / "cache.jsonl", stage2 / "round-1" / "student" / "cache.jsonl",
                  *(folder / "cache.jsonl" for folder in label_folders)]:
        cache_keys = [row["key"] for row in read_appended(cache)]
        assert cache_keys and len(cache_keys) == len(set(cache_keys)), cache
    train, valid = ids_in(teacher / "sft" / "train.jsonl"), ids_in(teacher / "sft" / "valid.jsonl")
    rejected = ids_in(teacher / "rejects.jsonl") if (teacher / "rejects.jsonl").exists() else []
    assert sorted(train + valid + rejected) == sorted(cases)
    kept = {row["id"]: row["messages"][-1]["content"] for split in ("train", "valid")
            for row in read_jsonl(teacher / "sft" / f"{split}.jsonl")}
    from datasets import load_from_disk
    for folder in label_folders:   # every case stage one kept, once, in the split stage one put it in
        soft = load_from_disk(str(folder / "dataset"))
        assert sorted(soft["train"]["id"]) == sorted(train) and sorted(soft["validation"]["id"]) == sorted(valid)
    # Stage two scored exactly the answers stage one kept: the same text, the same tokens (then <|im_end|>).
    tokenizer = qwen_tokenizer
    for row in (row for split in load_from_disk(str(stage2 / "softlabels" / "dataset")).values() for row in split):
        assert row["messages"][-1]["content"] == kept[row["id"]]
        assert row["answer_token_ids"][:-1] == tokenizer(kept[row["id"]], add_special_tokens=False)["input_ids"]
    for index in (1,):   # each round: about half the training cases carry the student's own answer
        answers = {row["id"]: row for row in read_jsonl(stage2 / f"round-{index}" / "answers.jsonl")}
        student = {row["id"]: row for row in read_jsonl(stage2 / f"round-{index}" / "student" / "predictions.jsonl")}
        assert sorted(answers) == sorted(kept) and set(train) <= set(student)
        own = {case_id for case_id, row in answers.items() if row["source"] == "student"}
        assert own and own < set(train), "a mix of 0.5 gives some training cases the student's answer, none held out"
        for case_id, row in answers.items():
            mine = student[case_id] if case_id in own else None
            assert row["messages"][-1]["content"] == (
                answer_json(Answer(mine["reason"], mine["diseases"])) if mine else kept[case_id])
        soft = load_from_disk(str(stage2 / f"round-{index}" / "softlabels" / "dataset"))
        for row in (row for split in soft.values() for row in split):
            assert row["messages"][-1]["content"] == answers[row["id"]]["messages"][-1]["content"]
    for model in ("base", "stage1", "stage2", "stage2/round-1"):
        ids = ids_in(out / model / "predict" / "predictions.jsonl")
        assert len(ids) == len(set(ids)) and set(cases) <= set(ids), model
    assert check_submission(SAMPLE_CASES, out / "submission.jsonl") == []
    # The model that answered the submission is named last and carries a card saying where it came from.
    model = out / "stage2" / "round-1" / "distill" / "merged"
    assert f"[pipeline] final model (it answered the submission; ship this folder): {model} " \
           f"(card: {model / 'README.md'})" in final.stdout + final.stderr
    card = (model / "README.md").read_text(encoding="utf-8")
    key = {name: read_record(out / "stamps" / f"{name}.json")["key"] for name in ("distill-1", "submission")}
    assert f"- Final model: `{key['distill-1']}`" in card and f"- Submission: `{key['submission']}`" in card
    assert "| round1 |" in card and f"| `{killed_run['cases']}` | train_cases | {len(cases)} |" in card
    scores = (out / "scores" / "scores.md").read_text(encoding="utf-8")
    assert all(f"| {name} " in scores for name in ("base", "stage1", "stage2", "round1")), scores
    assert (out / "scores" / "scores.png").exists() and (out / "scores" / "curves-distill-1.png").exists()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [row["step"] for row in summary][:len(STEPS)] == STEPS
    # After the kill, the round's distill resumed its own checkpoint (same key): it was never told to start fresh.
    assert "--fresh" not in (out / "logs" / "distill-1.log").read_text(errors="replace")


def plan_lines(recipe: Path, *extra: str) -> dict[str, tuple[str, str]]:
    """`--plan`'s verdict per step: {step: (run|skip, reason)}."""
    result = run_pipeline(recipe, "--plan", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = {}
    for line in result.stdout.splitlines():
        if line.startswith(("--limit ", "[pipeline] ")):   # the trial's note above the steps, the estimate below
            continue
        name, verdict, reason = line.split(None, 2)
        verdicts[name] = (verdict, reason.strip("()"))
    return verdicts


def statuses(out: Path) -> dict[str, str]:
    return {row["step"]: row["status"] for row in json.loads((out / "pipeline_summary.json").read_text())}


@pytest.mark.slow
@KILLED_RUN_TIMEOUT
def test_an_unchanged_or_touched_rerun_skips_every_step_in_seconds(killed_run):
    recipe, out = killed_run["recipe"], killed_run["out"]
    assert set(plan_lines(recipe).values()) == {("skip", "up to date")}
    later = time.time() + 120
    for name in ("cases", "user_prompt", "sft_overlay", "distill_overlay"):
        os.utime(killed_run[name], (later, later))
    assert set(plan_lines(recipe).values()) == {("skip", "up to date")}
    started = time.monotonic()
    rerun = run_pipeline(recipe, timeout=300)
    seconds = time.monotonic() - started
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert set(statuses(out).values()) == {"skipped"}
    print(f"unchanged re-run of the tiny pipeline: {seconds:.1f} s")
    assert seconds < 120


@pytest.mark.slow
@KILLED_RUN_TIMEOUT
def test_an_in_place_recipe_edit_reruns_that_step_and_its_dependents_only(killed_run):
    recipe, out = killed_run["recipe"], killed_run["out"]
    replace_in(killed_run["distill_overlay"], "learning_rate: 5.0e-3", "learning_rate: 4.0e-3")
    plan = plan_lines(recipe)
    after = STEPS[STEPS.index("distill"):] + ["score", "submission"]   # the rounds continue from stage two's model
    assert {name for name, (verdict, _) in plan.items() if verdict == "run"} == set(after)
    assert plan["distill"] == ("run", "recipe changed")
    assert plan["predict-stage2"] == ("run", "upstream distill changed")
    predicted, sampled = out / "stage2" / "predict", out / "stage2" / "round-1" / "student"
    earlier = {folder: len(load_cache(folder / "cache.jsonl")) for folder in (predicted, sampled)}
    rerun = run_pipeline(recipe, "--until", "student-1", timeout=1200)   # the steps after: the plan's word
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert {name for name, status in statuses(out).items() if status == "ran"} == {"distill", "predict-stage2",
                                                                                   "student-1"}
    last_command = (out / "logs" / "distill.log").read_text(errors="replace").split("\n=== ")[-1].splitlines()[0]
    assert last_command.endswith("--fresh"), "a changed key trains from the start, not from the old checkpoint"
    # The new model in the same folder (stage2/distill/merged) is asked every case again, for the score table
    # and for the on-policy round's samples: none of the old model's answers is reused; they are counted and
    # kept aside.
    for folder, rows in earlier.items():
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        assert rows > 0 and summary["stale_cache_rows"] == rows and summary["cache_rows_before"] == 0, folder
        assert summary["asked"] >= summary["cases"], folder
        assert {row["model"] for row in load_cache(folder / "cache.jsonl").values()} == \
            {summary["model_identity"]["identity"]}, folder
    plan = plan_lines(recipe)
    assert {name for name, (verdict, _) in plan.items() if verdict == "run"} == \
        set(after) - {"distill", "predict-stage2", "student-1"}
    assert plan["distill"] == ("skip", "up to date") and plan["predict-stage2"] == ("skip", "up to date")


@pytest.mark.slow
@KILLED_RUN_TIMEOUT
def test_a_full_finetune_sft_recipe_runs_without_merge_and_predict_serves_its_weights(killed_run):
    out = killed_run["tmp"] / "full"
    shutil.copytree(killed_run["out"], out, symlinks=True)   # a copied run folder stays up to date
    recipe_data = yaml.safe_load(killed_run["recipe"].read_text(encoding="utf-8"))
    recipe_data.update(out=str(out), stages=[1])
    recipe_data["stage1"]["sft"] = "recipes/sft/qwen2.5-7b-instruct-full-zero3.yaml"
    recipe_data["stage1"]["sft_set"] = ["deepspeed=null", "max_steps=4", "save_steps=2"]
    recipe = killed_run["tmp"] / "full.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data, allow_unicode=True), encoding="utf-8")
    plan = plan_lines(recipe)
    assert "merge" not in plan
    assert plan["teacher"] == ("skip", "up to date") and plan["predict-base"] == ("skip", "up to date")
    assert plan["sft"][0] == plan["predict-stage1"][0] == "run"
    rerun = run_pipeline(recipe, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert statuses(out)["sft"] == statuses(out)["predict-stage1"] == "ran"
    sft = out / "stage1" / "sft"
    assert (sft / "config.json").exists() and not (sft / "adapter_config.json").exists()
    assert check_submission(SAMPLE_CASES, out / "submission.jsonl") == []


@pytest.mark.slow
@KILLED_RUN_TIMEOUT
def test_a_changed_prompt_reruns_the_teacher_and_everything_that_reads_it(killed_run):
    recipe, out = killed_run["recipe"], killed_run["out"]
    with open(killed_run["user_prompt"], "a", encoding="utf-8") as prompt:
        prompt.write("\n请简洁。\n")
    plan = plan_lines(recipe)
    assert plan["teacher"] == ("run", f"{killed_run['user_prompt']} changed")
    assert plan["softlabels"] == ("run", "upstream teacher changed")   # stage two scores what the teacher kept
    assert {name for name, (verdict, _) in plan.items() if verdict == "skip"} == set()
    # A trial on the first 5 cases (--limit, through every stage) asks for those only, and is a run of its own:
    # neither it nor the full run takes the other's outputs as up to date.
    rerun = run_pipeline(recipe, "--until", "teacher", "--limit", "5", timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert statuses(out) == {"teacher": "ran"}
    summary = json.loads((out / "stage1" / "teacher" / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == 5, summary
    trial = plan_lines(recipe, "--limit", "5")
    assert trial["teacher"] == ("skip", "up to date") and trial["sft"][0] == "run"
    assert plan_lines(recipe)["teacher"][0] == "run"


def test_a_steps_progress_is_read_from_its_log_and_printed_as_plain_lines_off_a_terminal(capsys):
    log = ("teacher:   0%|          | 0/12 [00:00<?, ?it/s]\rteacher:  42%|████▏     | 5/12 [00:06<00:07]\n"
           "  0%|          | 0/16 [00:00<?, ?it/s]\r  6%|▋         | 1/16 [00:10<02:30, 10.0s/it]"
           "{'loss': '11.91', 'grad_norm': '1.5', 'learning_rate': '0.005', 'epoch': '0.11'}\n")
    assert progress_of(log[:log.index("\n")]) == "teacher 5/12"
    assert progress_of(log) == "step 1/16 loss 11.91"
    assert progress_of("vLLM server starting\n") is None
    assert progress_of("{'loss': '2.028', 'epoch': '1.444'}\n 81%|████▏| 13/16 [02:30<00:30]") == "step 13/16 loss 2.028"
    line = ProgressLine("sft", interval_s=0.0)   # pytest's captured stdout is not a terminal
    for text in ("step 1/16 loss 11.91", "step 1/16 loss 11.91", None, "step 2/16 loss 9.7"):
        line.update(text, 5.0)
    line.close()
    assert capsys.readouterr().out.splitlines() == ["[pipeline] sft: step 1/16 loss 11.91 (5 s)",
                                                    "[pipeline] sft: step 2/16 loss 9.7 (5 s)"]


@pytest.mark.integration
def test_the_preflight_checks_what_the_steps_that_run_need(tmp_path, monkeypatch):
    """`--until teacher` with the 1-GPU recipe on this CPU box, its hosted teacher answered by the fault server:
    the preflight checks the teacher's needs (cases, split, recipes, the endpoint and its key), not the GPU,
    attention or base model the later steps need, and the teacher step runs."""
    from custom_losses.pipeline.run import run_pipeline as run_in_process
    from prep.testing.fault_server import FaultServer

    monkeypatch.setenv("DASHSCOPE_API_KEY", "test-key-for-the-fault-server")
    with FaultServer(model="qwen2.5-72b-instruct") as server:
        overrides = [f"out={tmp_path / 'run'}", f"train_cases={SAMPLE_CASES}", f"test_cases={SAMPLE_CASES}",
                     "min_free_disk_gb=1",
                     f"stage1.teacher_set=[client.base_url={server.base_url},client.concurrency=4]"]
        out = run_in_process(REPO_ROOT / "recipes" / "pipeline" / "qwen2.5-7b-1gpu.yaml", overrides, until="teacher")
    summary = json.loads((out / "stage1" / "teacher" / "summary.json").read_text(encoding="utf-8"))
    assert summary["answered"] == summary["cases"] == 12
    assert (out / "stage1" / "teacher" / "sft" / "train.jsonl").is_file()


@pytest.mark.parametrize("code, expected", [(1, 1), (2, 2), (3, 3), (-9, 1), (70, 1)])
def test_a_failed_step_gives_the_pipeline_its_own_exit_code(tmp_path, code, expected):
    """One failure, one code (prep.cli's table): a step that says 'run again' (1), 'fix the input' (2) or 'the disk
    filled' (3) makes the pipeline say the same; a crash or a signal is 1, since a rerun resumes it."""
    from custom_losses.pipeline.steps import PipelineError, Step, run_step

    body = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)" if code < 0 else f"raise SystemExit({code})"
    step = Step("failing", [sys.executable, "-c", body], outputs=[])
    with pytest.raises(PipelineError) as failed:
        run_step(step, tmp_path, timeout_s=60, progress_interval_s=60)
    assert failed.value.exit_code == expected and "step failing failed" in str(failed.value)
