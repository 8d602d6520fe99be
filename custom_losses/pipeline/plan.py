"""The whole pipeline, make-like: stage one (teacher -> SFT -> merge -> predict) and stage two (soft
labels -> distill -> predict), then the score table and the submission. `python -m launch.pipeline`
is its command.

Each step runs one of the stage commands users run by hand (`python -m launch.<stage> --config
RECIPE ... --set key=value`), with its own log file under OUT/logs/. A step is skipped when its
content key (custom_losses.pipeline.steps: its composed recipe, the content of what it reads, its upstream steps' keys
and its code) matches its stamp and its outputs validate; `--plan` prints that decision for every
step and runs nothing. A crashed run is restarted with the same command and every step resumes from
its own cache or checkpoint. Everything is checked before anything costly starts, by the doctor (`python
-m launch.doctor`): the case files, every stage recipe through custom_losses.pipeline.catalogue (with the overlays and
overrides its step will get), the machine against every step's needs, free disk, the vLLM
environment and any hosted teacher's endpoint.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from custom_losses.pipeline.cost import Budget, EstimateSettings, Prices
from custom_losses.pipeline.steps import (
    DATA_KEY,
    Decision,
    PipelineError,
    StageCommand,
    Step,
    command_argv,
    decide,
)
from custom_losses.pipeline.teachers import refuse_unscorable
from prep.config import RecipeError, compose, load_recipe
from prep.eval.score import DEFAULT_RECIPE as DEFAULT_SCORE_RECIPE
from prep.eval.submission import check_submission, read_submission_lines, validate_lines
from prep.jsonio import InputError, read_jsonl, write_jsonl_atomic, write_text_atomic
from prep.paths import resolve_path
from prep.records import contamination_of, read_cases
from prep.stages.teacher import Split, split_ids

# The predict overlay for a student trained on reasoning traces (student_overlays).
REASONING_PREDICT_OVERLAY = "recipes/predict/overrides/reasoning.yaml"
CONTAMINATION_FILE = "contamination.json"   # under scores/: the test cases that copy training cases


@dataclass
class StageOne:
    teacher: str                                            # recipes/teacher/*.yaml
    sft: str                                                # recipes/sft/*.yaml (Axolotl)
    predict: str                                            # recipes/predict/*.yaml
    teacher_set: list[str] = field(default_factory=list)    # key=value overrides, passed as --set
    sft_overlays: list[str] = field(default_factory=list)   # YAML overlays merged over the SFT recipe (--overlay)
    sft_set: list[str] = field(default_factory=list)
    predict_set: list[str] = field(default_factory=list)


@dataclass
class StageTwo:
    softlabels: str                                         # recipes/softlabels/*.yaml
    distill: str                                            # recipes/distill/*.yaml (TRL)
    predict: str
    softlabels_set: list[str] = field(default_factory=list)
    distill_overlays: list[str] = field(default_factory=list)
    distill_set: list[str] = field(default_factory=list)
    predict_set: list[str] = field(default_factory=list)
    # kept: the soft-label teacher scores the answers stage one kept (by agreement), token by token, with
    # prompt_logprobs (a vLLM teacher); fresh: it samples a new answer per case with its top-k log-probs.
    softlabel_answers: str = "kept"
    # On-policy rounds after stage two (prep.stages.onpolicy): the student answers the training cases (predict with
    # on_policy_set), the teacher scores a mix of those and its own answers, distill continues on them.
    on_policy_rounds: int = 0
    on_policy_mix: float = 1.0                              # GKD's lmbda: share of training cases answered by the student
    on_policy_seed: int = 2025                              # which cases get the student's answer (prep.stages.onpolicy)
    on_policy_set: list[str] = field(default_factory=lambda: ["sampling.temperature=1.0"])   # the student's sampling
    on_policy_distill_set: list[str] = field(default_factory=list)   # a round's distill overrides, e.g. a lower lr

    def __post_init__(self) -> None:
        if self.softlabel_answers not in ("kept", "fresh"):
            raise ValueError(f"key 'stage2.softlabel_answers': must be kept or fresh, got {self.softlabel_answers!r}")
        if self.on_policy_rounds < 0:
            raise ValueError("key 'stage2.on_policy_rounds': must be 0 or more")
        if not 0 <= self.on_policy_mix <= 1:
            raise ValueError(f"key 'stage2.on_policy_mix': must be in [0, 1], got {self.on_policy_mix}")

    @property
    def scores_fixed_answers(self) -> bool:
        """Whether the soft-label teacher must score given answers (prompt_logprobs: a vLLM server)."""
        return self.softlabel_answers == "kept" or self.on_policy_rounds > 0


@dataclass
class ScoreStep:
    config: str = DEFAULT_SCORE_RECIPE                      # recipes/score/*.yaml
    set: list[str] = field(default_factory=list)            # e.g. ["fuzzy_threshold=0.6"]


@dataclass
class PipelineRecipe:
    train_cases: str                  # cases the teacher labels
    test_cases: str                   # cases the submission answers
    out: str                          # run folder: OUT/stage1, OUT/stage2, OUT/base, OUT/scores, OUT/submission.jsonl
    base_model: str                   # the untuned student, scored as the baseline
    stage1: StageOne
    stage2: StageTwo | None = None
    score: ScoreStep = field(default_factory=ScoreStep)
    stages: list[int] = field(default_factory=lambda: [1, 2])
    min_free_disk_gb: float = 50.0
    step_timeout_s: float = 48 * 3600
    score_baseline: bool = True
    progress_interval_s: float = 30.0     # a plain progress line at most this often when not on a terminal
    # What a run costs before it starts (custom_losses.pipeline.cost, docs/COST.md): the estimate's assumptions,
    # the prices, and a budget a run's estimate must stay under.
    estimate: EstimateSettings = field(default_factory=EstimateSettings)
    prices: Prices = field(default_factory=Prices)
    budget: Budget = field(default_factory=Budget)

    def __post_init__(self) -> None:
        if not set(self.stages) <= {1, 2} or not self.stages:
            raise ValueError("stages must be a non-empty subset of [1, 2]")
        if 2 in self.stages and self.stage2 is None:
            raise ValueError("stages includes 2 but the recipe has no stage2 section")


# --------------------------------------------------------------------------- the plan

def path_override(key: str, path: Path) -> str:
    """`key="path"`: quoted, so the YAML parse of the override keeps any path a string."""
    return f"{key}={json.dumps(str(path))}"


@dataclass(frozen=True)
class Layout:
    """Where each step of a run reads and writes, under the recipe's `out` folder."""

    out: Path
    train_cases: Path
    test_cases: Path
    limit: int | None = None        # --limit N: a trial on the first N training and test cases

    @property
    def limit_flag(self) -> tuple[str, ...]:
        """`--limit N` for the stage commands that read the case files (none in a full run)."""
        return ("--limit", str(self.limit)) if self.limit else ()

    @property
    def submission_cases(self) -> Path:     # the cases the submission answers: the first N of a trial's
        return self.out / f"test_cases.first{self.limit}.jsonl" if self.limit else self.test_cases

    @property
    def stage1(self) -> Path:
        return self.out / "stage1"

    @property
    def stage2(self) -> Path:
        return self.out / "stage2"

    @property
    def teacher(self) -> Path:
        return self.stage1 / "teacher"

    @property
    def valid_reference(self) -> Path:       # the teacher's held-out answers: the score's reference
        return self.teacher / "sft" / "valid.jsonl"

    def round(self, index: int) -> Path:    # on-policy round INDEX: student/, answers.jsonl, softlabels/, distill/, predict/
        return self.stage2 / f"round-{index}"

    @property
    def predict_cases(self) -> Path:         # test cases plus the held-out ones, answered by one server per model
        return self.out / "predict_cases.jsonl"


def absolute(path: str | Path) -> str:
    """PATH resolved as every command resolves it, made absolute: steps run in the repository, wherever the
    pipeline was started, and a step's stamp must not depend on the working directory."""
    return str(resolve_path(path).absolute())


def layout_of(recipe: PipelineRecipe) -> Layout:
    return Layout(*(Path(absolute(path)) for path in (recipe.out, recipe.train_cases, recipe.test_cases)))


def sft_is_full(recipe: PipelineRecipe) -> bool:
    """A full fine-tune SFT recipe (no `adapter`) saves the model itself: no merge step, and predict and distill
    read the SFT output folder."""
    s1 = recipe.stage1
    return not compose(absolute(s1.sft), list(map(absolute, s1.sft_overlays)), list(s1.sft_set)).get("adapter")


def stage_one_model(recipe: PipelineRecipe) -> Path:
    where = layout_of(recipe)
    return where.stage1 / ("sft" if sft_is_full(recipe) else "merged")


def stage_runs(recipe: PipelineRecipe) -> dict[str, StageCommand]:
    """Every stage command of the run with the overrides that place its inputs and outputs in the run folder."""
    where, s1, s2 = layout_of(recipe), recipe.stage1, recipe.stage2
    trained = student_overlays(recipe)
    runs = {
        "teacher": StageCommand("teacher", absolute(s1.teacher), (), tuple(s1.teacher_set)),
        "sft": StageCommand("sft", absolute(s1.sft), tuple(map(absolute, s1.sft_overlays)),
                        (*s1.sft_set, *sft_paths(where))),
        "predict-base": StageCommand("predict", absolute(s1.predict), (), tuple(s1.predict_set)),
        "predict-stage1": StageCommand("predict", absolute(s1.predict), trained, tuple(s1.predict_set)),
        "score": StageCommand("score", absolute(recipe.score.config), (), tuple(recipe.score.set)),
    }
    if 2 in recipe.stages:
        runs.update({
            "softlabels": StageCommand("softlabels", absolute(s2.softlabels), (), tuple(s2.softlabels_set)),
            "distill": distill_run(s2, (), where.stage2 / "softlabels", where.stage2 / "distill",
                                   stage_one_model(recipe)),
            "predict-stage2": StageCommand("predict", absolute(s2.predict), trained, tuple(s2.predict_set)),
        })
        if s2.on_policy_rounds:
            # A round's student answering the training cases: sampled as on_policy_set says, with no seed (one
            # request seed shared by every case would draw every case's tokens from the same random stream);
            # the step's cache keeps its answers for a re-run, and each round's model gives it a key of its own.
            runs["student"] = StageCommand("predict", absolute(s2.predict), trained, (*s2.predict_set, *s2.on_policy_set))
        for index in range(1, s2.on_policy_rounds + 1):   # each round continues from the model before it
            runs[f"distill-{index}"] = distill_run(s2, s2.on_policy_distill_set, where.round(index) / "softlabels",
                                                   where.round(index) / "distill", round_start(where, index))
    return runs


def round_start(where: Layout, index: int) -> Path:
    """The model on-policy round INDEX starts from: stage two's, then each round's."""
    return where.round(index - 1) / "distill" / "merged" if index > 1 else where.stage2 / "distill" / "merged"


def student_overlays(recipe: PipelineRecipe) -> tuple[str, ...]:
    """Predict overlays for the trained student: one trained on the teacher's reasoning traces (teacher recipe
    `reasoning: target`) writes the trace first, so its answer constraint must open with it. The base model
    answers in the plain shape."""
    s1 = recipe.stage1
    teacher = compose(absolute(s1.teacher), [], list(s1.teacher_set))
    return (absolute(REASONING_PREDICT_OVERLAY),) if teacher.get("reasoning") == "target" else ()


def distill_run(s2: StageTwo, extra: Sequence[str], dataset: Path, output: Path, model: Path) -> StageCommand:
    """The distill command on DATASET from MODEL into OUTPUT: stage two's, or a round's with EXTRA overrides."""
    paths = (path_override("dataset_path", dataset), path_override("output_dir", output),
             path_override("model_name_or_path", model))
    return StageCommand("distill", absolute(s2.distill), tuple(map(absolute, s2.distill_overlays)),
                    (*s2.distill_set, *extra, *paths))


def sft_paths(where: Layout) -> tuple[str, ...]:
    """The SFT recipe's data and output keys moved into this run's folder (after the user's own overrides).
    Axolotl's tokenised-dataset cache sits in a folder named by the digest of what the step reads (the
    teacher's key, the chat template, the base model), so a re-run never trains on rows made from old data."""
    sft = where.stage1 / "sft"
    return (path_override("output_dir", sft), path_override("dataset_prepared_path", sft / "prepared" / DATA_KEY),
            path_override("datasets.0.path", where.teacher / "sft" / "train.jsonl"),
            path_override("test_datasets.0.path", where.valid_reference))


def predict_step(name: str, run: StageCommand, model: str | Path, where: Layout, out: Path,
                 deps: tuple[str, ...]) -> Step:
    """Answers for the test cases plus the held-out ones (whose ids come from the teacher's split)."""
    cases = where.predict_cases
    return Step(name, run.argv("--model", str(model), "--input", str(cases), "--out", str(out)),
                [out / "predictions.jsonl", out / "submission.jsonl"],
                validate=lambda: require_valid_submission(cases, out / "submission.jsonl"),
                before=lambda: write_predict_cases(where), deps=("teacher", *deps),
                inputs=(where.test_cases, where.train_cases), recipe=run)


def stage_one_steps(recipe: PipelineRecipe, runs: dict[str, StageCommand], where: Layout) -> list[Step]:
    train, sft = where.teacher / "sft" / "train.jsonl", where.stage1 / "sft"
    full = sft_is_full(recipe)
    steps = [
        Step("teacher", runs["teacher"].argv("--input", str(where.train_cases), *where.limit_flag,
                                             "--out", str(where.teacher)),
             [where.teacher / "summary.json", train, where.valid_reference],
             validate=lambda: (require_unique_ids(train), require_unique_ids(where.valid_reference)),
             inputs=(where.train_cases,), recipe=runs["teacher"]),
        Step("sft", runs["sft"].argv(), [sft / ("config.json" if full else "adapter_config.json")],
             deps=("teacher",), recipe=runs["sft"], fresh_flag="--fresh"),
    ]
    if not full:
        steps.append(Step("merge", command_argv("merge", str(sft)), [where.stage1 / "merged" / "config.json"],
                          deps=("sft",)))
    if recipe.score_baseline:  # the untuned student, served and asked exactly as stage one's model
        base = resolve_path(recipe.base_model)
        steps.append(predict_step("predict-base", runs["predict-base"], recipe.base_model, where,
                                  where.out / "base" / "predict", ()))
        if base.is_dir():   # a local base model's content is part of the key; a hub id is, by its name, in the argv
            steps[-1].inputs += (base,)
    steps.append(predict_step("predict-stage1", runs["predict-stage1"], stage_one_model(recipe), where,
                              where.stage1 / "predict", ("sft" if full else "merge",)))
    return steps


def stage_two_steps(recipe: PipelineRecipe, runs: dict[str, StageCommand], where: Layout) -> list[Step]:
    s2 = where.stage2
    kept = recipe.stage2.softlabel_answers == "kept"
    # Fresh samples still take stage one's split (and its agreement as each case's weight): stage two must not train
    # on the cases stage one holds out for the score table.
    answers = ("--answers" if kept else "--split-from", str(where.teacher))
    steps = [
        Step("softlabels", runs["softlabels"].argv("--input", str(where.train_cases), *answers, *where.limit_flag,
                                                   "--out", str(s2 / "softlabels")),
             [s2 / "softlabels" / "dataset" / "dataset_dict.json"], inputs=(where.train_cases,),
             deps=("teacher",), recipe=runs["softlabels"]),
        Step("distill", runs["distill"].argv(), [s2 / "distill" / "merged" / "config.json"],
             deps=("softlabels", "sft" if sft_is_full(recipe) else "merge"), recipe=runs["distill"],
             fresh_flag="--fresh"),
        predict_step("predict-stage2", runs["predict-stage2"], s2 / "distill" / "merged", where, s2 / "predict",
                     ("distill",)),
    ]
    for index in range(1, recipe.stage2.on_policy_rounds + 1):
        steps += round_steps(recipe.stage2, runs, where, index)
    return steps


def round_steps(s2: StageTwo, runs: dict[str, StageCommand], where: Layout, index: int) -> list[Step]:
    """On-policy round INDEX, continuing from the model before it (round_start): the student answers the
    training cases, prep.stages.onpolicy mixes its answers with the teacher's, the soft-label teacher scores them,
    distill continues on them, and the round's model answers the predict cases for the score table."""
    folder, train, model = where.round(index), where.train_cases, round_start(where, index)
    model_step = f"distill-{index - 1}" if index > 1 else "distill"
    student, answers, labels, distill = (folder / "student", folder / "answers.jsonl", folder / "softlabels",
                                         folder / "distill")
    sampler, trainer = runs["student"], runs[f"distill-{index}"]
    return [
        Step(f"student-{index}", sampler.argv("--model", str(model), "--input", str(train), *where.limit_flag,
                                              "--out", str(student)),
             [student / "predictions.jsonl", student / "submission.jsonl"],
             validate=lambda: require_valid_submission(train, student / "submission.jsonl", where.limit),
             deps=(model_step,), inputs=(train,), recipe=sampler),
        Step(f"mix-{index}", command_argv("onpolicy", "--teacher", str(where.teacher), "--student",
                              str(student / "predictions.jsonl"), "--mix", str(s2.on_policy_mix),
                              "--seed", str(s2.on_policy_seed),
                              "--round", str(index), "--out", str(answers)),
             [answers], deps=("teacher", f"student-{index}")),
        Step(f"softlabels-{index}", runs["softlabels"].argv("--input", str(train), "--answers", str(answers),
                                                            *where.limit_flag, "--out", str(labels)),
             [labels / "dataset" / "dataset_dict.json"], inputs=(train,), deps=(f"mix-{index}",),
             recipe=runs["softlabels"]),
        Step(f"distill-{index}", trainer.argv(), [distill / "merged" / "config.json"],
             deps=(f"softlabels-{index}", model_step), recipe=trainer, fresh_flag="--fresh"),
        predict_step(f"predict-round{index}", runs["predict-stage2"], distill / "merged", where, folder / "predict",
                     (f"distill-{index}",)),
    ]


def build_plan(recipe: PipelineRecipe, limit: int | None = None) -> list[Step]:
    """Every step in order: stage one, stage two when asked, the score table, the submission. LIMIT: a trial on
    the first LIMIT training and test cases (the steps that read the case files are told, the predict cases and
    the submission's cases are cut to it)."""
    where, runs = dataclasses.replace(layout_of(recipe), limit=limit), stage_runs(recipe)
    steps = stage_one_steps(recipe, runs, where)
    if 2 in recipe.stages:
        steps += stage_two_steps(recipe, runs, where)
    predicted = {step.name.removeprefix("predict-"): step.outputs[0] for step in steps
                 if step.name.startswith("predict-")}   # base, stage1, stage2: the score table's rows
    scores = where.out / "scores"
    curves = curve_sources(recipe)
    # Test cases that copy training cases, in the report (not when the test file is the training file: the demo).
    copied = scores / CONTAMINATION_FILE if where.train_cases.resolve() != where.test_cases.resolve() else None
    steps.append(Step("score", runs["score"].argv(str(where.valid_reference), *map(str, predicted.values()),
                                                  "--curves", *(f"{name}={path}" for name, path in curves.items()),
                                                  "--out", str(scores), "--names", *predicted,
                                                  *(("--contamination", str(copied)) if copied else ())),
                      [scores / "scores.md", scores / "scores.png", *curve_files(recipe).values(),
                       *((copied,) if copied else ())],
                      before=(lambda: write_contamination(where, copied)) if copied else None,
                      inputs=(where.train_cases, where.test_cases) if copied else (),
                      deps=("teacher", *curves, *(f"predict-{name}" for name in predicted)), recipe=runs["score"]))
    final = list(predicted)[-1]
    submission, cases = where.out / "submission.jsonl", where.submission_cases
    steps.append(Step("submission", command_argv("submission", "write", str(cases), str(predicted[final]),
                                                 str(submission)),
                      [submission], validate=lambda: require_valid_submission(where.test_cases, submission, limit),
                      before=lambda: write_first_cases(where.test_cases, cases, limit),
                      deps=(f"predict-{final}",), inputs=(where.test_cases,)))
    return run_order(steps)


# Steps brought forward to right after the teacher's, in this order, so that a server can serve them in a row
# (custom_losses.pipeline.servers): the soft-label teacher, usually the teacher itself, scores the kept answers
# before SFT needs the machine; the base model, which the teacher's server serves when it is the same model.
# (Stage two's predictions and the first on-policy round's student answers, one model, are adjacent already.)
AFTER_TEACHER = ("softlabels", "predict-base")


def run_order(steps: list[Step]) -> list[Step]:
    """STEPS (in the stages' own order, which each step keeps as its rank for --until) in the order they run:
    AFTER_TEACHER moved up behind the teacher. Every step still follows the steps it reads from."""
    for rank, step in enumerate(steps):
        step.rank = rank
    moved = [step for name in AFTER_TEACHER for step in steps if step.name == name]
    order = [step for step in steps if step.name not in AFTER_TEACHER]
    at = next(i for i, step in enumerate(order) if step.name == "teacher") + 1
    order[at:at] = moved
    seen: set[str] = set()
    for step in order:
        if not set(step.deps) <= seen:      # a dependency after its reader would make decide() wrong
            raise AssertionError(f"run order puts {step.name} before {sorted(set(step.deps) - seen)}")
        seen.add(step.name)
    return order


def write_contamination(where: Layout, path: Path) -> None:
    """Which test cases are exact or near copies of training cases (prep.near_duplicates at its defaults), for the
    score report and the pipeline's summary: a copied case's score says little about the unseen ones."""
    report = contamination_of(read_cases(where.train_cases).cases, read_cases(where.test_cases).cases)
    write_text_atomic(path, json.dumps(report, ensure_ascii=False, indent=1) + "\n")


def contamination_figures(recipe: PipelineRecipe) -> dict | None:
    """The score step's contamination counts and shares, for the pipeline's summary; None when not checked."""
    where = layout_of(recipe)
    path = where.out / "scores" / CONTAMINATION_FILE
    if where.train_cases.resolve() == where.test_cases.resolve() or not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in report.items() if key != "copies"}


def curve_sources(recipe: PipelineRecipe) -> dict[str, Path]:
    """The training steps whose trainer_state.json the report plots: {step: its output folder}."""
    where = layout_of(recipe)
    sources = {"sft": where.stage1 / "sft"}
    if 2 in recipe.stages:
        sources["distill"] = where.stage2 / "distill"
        for index in range(1, recipe.stage2.on_policy_rounds + 1):
            sources[f"distill-{index}"] = where.round(index) / "distill"
    return sources


def curve_files(recipe: PipelineRecipe) -> dict[str, Path]:
    """The report's training-curve PNGs, beside the score table (launch.score --curves)."""
    return {name: layout_of(recipe).out / "scores" / f"curves-{name}.png" for name in curve_sources(recipe)}


def write_predict_cases(where: Layout) -> None:
    """Test cases (a trial's first N), then the validation cases not already among them (ids from the teacher's
    split)."""
    tests = read_cases(where.test_cases).cases[:where.limit]
    valid_ids = {row["id"] for row in read_jsonl(where.valid_reference)}
    seen = {case.id for case in tests}
    extra = [case for case in read_cases(where.train_cases).cases if case.id in valid_ids and case.id not in seen]
    write_jsonl_atomic(where.predict_cases, [case.to_json() for case in tests + extra])


def write_first_cases(cases: Path, out: Path, limit: int | None) -> None:
    """A trial's case file: the first LIMIT cases of CASES (nothing to write in a full run)."""
    if limit:
        write_jsonl_atomic(out, [case.to_json() for case in read_cases(cases).cases[:limit]])


def require_valid_submission(cases: Path, submission: Path, limit: int | None = None) -> None:
    """SUBMISSION answers the cases of CASES (its first LIMIT in a trial), each once, in order."""
    if limit is None:
        problems = check_submission(cases, submission)
    else:
        try:
            problems = validate_lines(read_cases(cases).cases[:limit], read_submission_lines(submission), submission)
        except InputError as err:
            problems = [err]
    if problems:
        raise PipelineError(f"{submission}: {problems[0]}")


def require_unique_ids(path: Path) -> None:
    ids = [row.get("id") for row in read_jsonl(path)]
    if len(ids) != len(set(ids)):
        raise PipelineError(f"{path}: duplicate ids")


# --------------------------------------------------------------------------- preflight

def validate_recipe(path: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> PipelineRecipe:
    """The pipeline recipe's own keys, and that every stage recipe and overlay it names exists."""
    recipe = load_recipe(PipelineRecipe, path, list(overrides), overlays)
    stages = [recipe.stage1] + ([recipe.stage2] if recipe.stage2 else [])
    named = [value for stage in stages for key, value in vars(stage).items()
             if key in ("teacher", "sft", "predict", "softlabels", "distill")]
    named += [overlay for stage in stages for overlay in getattr(stage, "sft_overlays", [])
              + getattr(stage, "distill_overlays", [])]
    for name in [*named, recipe.score.config]:
        if not resolve_path(name).exists():
            raise RecipeError(path, None, f"names {name}, which does not exist")
    if 2 in recipe.stages:
        refuse_unscorable(path, recipe)
    return recipe


def check_split(train_cases: Path, split: Split) -> str:
    """The teacher's split must leave training rows (a case it rejects later only makes fewer)."""
    cases = read_cases(train_cases).cases
    ids = [case.id for case in cases]
    valid = split_ids(cases, ids, split)
    if len(valid) == len(ids):
        raise PipelineError(f"{train_cases}: the teacher's split (valid_fraction={split.valid_fraction}) holds out "
                            f"all {len(ids)} case(s), leaving no training rows; add cases or lower valid_fraction")
    return f"{len(ids) - len(valid)} training and {len(valid)} held-out case(s) at most"


def missing_case_files(recipe: PipelineRecipe) -> str | None:
    """One sentence naming the first case file the recipe names that is not there, and the fix; None when both are."""
    for key in ("train_cases", "test_cases"):
        path = getattr(recipe, key)
        if not resolve_path(path).is_file():
            return (f"{path} (the recipe's {key}) not found: put your cases there "
                    f"(data/competition/README.md says which file is which) or name yours: --set {key}=PATH")
    return None


def require_case_files(recipe: PipelineRecipe) -> None:
    """The case files the keys of every step are made from exist: else PipelineError naming the key and the fix."""
    missing = missing_case_files(recipe)
    if missing:
        raise PipelineError(missing)


def plan_pipeline(recipe: PipelineRecipe, limit: int | None = None) -> list[Decision]:
    """Every step of RECIPE with its key and whether it runs (and why); runs nothing. LIMIT (--limit N) is part of
    every step's key: a trial and a full run never take each other's outputs as up to date."""
    require_case_files(recipe)
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit {limit}: give a number of cases, 1 or more")
    out = layout_of(recipe).out
    return decide(build_plan(recipe, limit), out, out / "stamps", limit)
