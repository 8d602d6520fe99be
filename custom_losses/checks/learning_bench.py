"""Does the student learn, and does stage two beat more SFT? The learning benchmark (`python -m launch.bench_learning`).

The task: the known teacher (prep.testing.known_teacher) diagnoses from the chief complaint (data/known_teacher/
findings.json: 14 rules, 20 disease names, two or three candidate answers at 0.6/0.3/0.1 or 0.7/0.3). The cases:
the real step-one cases whose `主诉` line a rule matches (about 1,700 of 3,000), each cut to `主诉: …` (at most
CHIEF_COMPLAINT_CHARS characters), asked with a one-line system prompt and the case alone as the user turn
(data/known_teacher/*.txt): ../shared/README.md measured that the tiny student learns this (0.84) and not the full
prompts (0.18). The teacher's split holds out ~10 % of them; accuracy on those is the share whose greedy answer's
`diseases` is exactly the teacher's most probable disease.

The runs, all through the real stage commands of the pipeline recipe (recipes/pipeline/learning-cpu.yaml), each a
process with its log under OUT/logs/, the known teacher served in this process:
- teacher: one sample per case (launch.teacher); soft labels: the teacher's exact top-k log-probs of the answers it
  kept (launch.softlabels --answers, /v1/completions prompt_logprobs);
- stage one: Axolotl SFT, full fine-tuning of the tiny student (recipes/sft/overrides/learning-cpu.yaml:
  sequence_len 256, lr 2e-3, its max_steps);
- from stage one, each in our distill trainer (custom_losses.kd) for stage two's number of optimiser steps
  (recipes/distill/overrides/learning-cpu.yaml's max_steps), on the same packed rows with the same learning rate
  and schedule, so that they differ in the loss only: sft_more (`kd_alpha: 0`, cross-entropy on the teacher's
  answers stage one trained on: SFT continued, the honest baseline; learning-sft.yaml) and kd (0.7 forward KL on
  the renormalised top-k + 0.3 CE, unweighted), each with SEEDS seeds; kd_tail (`kd_support: tail`) and
  kd_weighted (the diagnosis weight, w_diseases 2) with the first seed. (The continuation runs in the distill
  trainer rather than Axolotl because only the loss should differ, and because there an optimiser step of these
  rows takes ~0.45 s against Axolotl's ~2.2 s on this CPU: it computes logits at the answer tokens only.)
Then every model (the base, stage one and each run) answers the held-out cases greedily in this process
(transformers generate, no constraint: an answer that does not parse counts as wrong).

Writes OUT/bench.json (every figure, each run's last logged loss terms and wall time) and prints a table; the
last line is `acc_base=A0 acc_stage1=A1 acc_sft_more=A2 acc_kd=A3 acc_kd_tail=A4 acc_kd_weighted=A5 seeds=N`
(A2 and A3: the mean over seeds; the table gives each seed and the spread).

The run of record (450 stage-one steps, 150 stage-two steps, 168 held-out cases, majority class 0.196, 878 s on
the quiet 2-core box): base 0.000, stage one 0.631, sft_more 0.653 (0.601/0.667/0.690), kd 0.716
(0.714/0.732/0.702), kd_tail 0.786, kd_weighted 0.744 (docs/MEASUREMENTS.md). Renormalised top-k KD's own term is
0.001-0.02 nats from the first steps (the teacher's top 20 past its two or three real candidates is zero-probability
filler the student soon ranks right), so most of its gradient is the CE term's; the tail bucket's KD term stays at
the CE's size (0.19 -> 0.08): it also pulls the student's mass off everything outside the top k, toward the
teacher's full distribution.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_losses.pipeline.plan import PipelineRecipe, layout_of, path_override, sft_paths, validate_recipe
from custom_losses.pipeline.steps import DATA_KEY, StageCommand
from custom_losses.train.launcher import run_logged
from prep.answers import AnswerError, parse_answer
from prep.config import compose
from prep.jsonio import read_jsonl, write_jsonl_atomic
from prep.paths import resolve_path
from prep.prompts import PromptSet, load_prompts
from prep.records import Case, read_cases
from prep.testing.known_teacher import FindingsTable, known_teacher_server
from prep.testing.tiny_model import resolve_model

DEFAULT_RECIPE = "recipes/pipeline/learning-cpu.yaml"
SFT_OVERLAY = "recipes/distill/overrides/learning-sft.yaml"
TAIL_OVERLAY = "recipes/distill/overrides/learning-tail.yaml"
WEIGHTED_OVERLAY = "recipes/distill/overrides/learning-weighted.yaml"
CHIEF_COMPLAINT_CHARS = 48      # a longer complaint is cut: the rows stay ~40 tokens, six to a packed row
FIRST_SEED = 42
LAST_LINE_KEYS = ("base", "stage1", "sft_more", "kd", "kd_tail", "kd_weighted")


class BenchError(RuntimeError):
    """A run of the benchmark failed: which, and where its log is."""


@dataclass(frozen=True)
class Run:
    """One trained model of the benchmark."""

    name: str                       # sft_more, kd, kd_tail, kd_weighted
    seed: int
    command: StageCommand
    output: Path                    # what it trains into (emptied first)
    model_dir: Path                 # the model evaluated

    @property
    def label(self) -> str:
        return f"{self.name}-s{self.seed}"


def short_cases(path: str | Path, table: FindingsTable, limit: int | None = None) -> list[Case]:
    """The cases whose chief complaint a rule matches, each cut to `主诉: …` (the first LIMIT of them)."""
    kept = []
    for case in read_cases(resolve_path(path)).cases:
        if table.matched(case.feature_content) is None:
            continue
        line = next((line for line in case.feature_content.splitlines() if line.startswith(("主诉:", "主诉："))), None)
        complaint = line.split(":", 1)[-1].split("：", 1)[-1].strip()[:CHIEF_COMPLAINT_CHARS] if line else ""
        if not complaint or table.matched(f"主诉: {complaint}") is None:
            continue        # its matching term lay past the cut
        kept.append(Case(id=case.id, feature_content=f"主诉: {complaint}"))
        if limit and len(kept) == limit:
            break
    return kept


def greedy_accuracy(model_dir: str | Path, cases: list[Case], prompts: PromptSet, table: FindingsTable,
                    batch_size: int = 32, max_new_tokens: int = 64) -> float:
    """The share of CASES whose greedy answer names exactly the teacher's most probable disease."""
    import torch
    from transformers import AutoModelForCausalLM

    from prep.tokenizer import chat_token_ids, load_tokenizer

    tokenizer = load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    right = 0
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        prompts_ids = [chat_token_ids(tokenizer, prompts.messages(case), add_generation_prompt=True) for case in batch]
        width = max(map(len, prompts_ids))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])      # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
        for case, row in zip(batch, out[:, width:].tolist()):
            try:
                said = parse_answer(tokenizer.decode(row, skip_special_tokens=True)).diseases
            except AnswerError:
                continue
            right += said == table.top_disease(prompts.user(case))
    return right / len(cases) if cases else 0.0


def last_losses(output_dir: Path) -> dict[str, float]:
    """The last logged value of each loss term (loss, kd, ce, ...) in OUTPUT_DIR's trainer_state.json."""
    state = output_dir / "trainer_state.json"
    if not state.exists():
        return {}
    found: dict[str, float] = {}
    for entry in json.loads(state.read_text(encoding="utf-8")).get("log_history", []):
        found.update({k: v for k, v in entry.items() if "loss" in k and isinstance(v, (int, float))})
    return found


class LearningBench:
    """The runs of one benchmark: the recipe's stage commands, the known teacher, the held-out cases."""

    def __init__(self, config: str | Path = DEFAULT_RECIPE, out: str | Path | None = None, seeds: int = 3,
                 limit: int | None = None, sft_set: Sequence[str] = (), distill_set: Sequence[str] = (),
                 log: Callable[[str], None] = print):
        self.recipe: PipelineRecipe = validate_recipe(config)
        if out is not None:
            self.recipe.out = str(out)
        self.out = Path(layout_of(self.recipe).out)
        self.seeds, self.limit, self.log = seeds, limit, log
        self.sft_set, self.distill_set = tuple(sft_set), tuple(distill_set)
        self.table = FindingsTable()
        teacher = compose(str(resolve_path(self.recipe.stage1.teacher)), [], list(self.recipe.stage1.teacher_set))
        self.prompts = load_prompts(teacher["prompts"]["system"], teacher["prompts"]["user"])
        self.timings: dict[str, float] = {}

    # ---- the steps ---------------------------------------------------------------------------------------------
    def _run(self, label: str, argv: list[str]) -> None:
        started = time.perf_counter()
        log_path = self.out / "logs" / f"{label}.log"
        log_path.unlink(missing_ok=True)
        self.log(f"[bench] {label}: running (log {log_path})")
        if run_logged(argv, log_path) != 0:
            raise BenchError(f"{label} failed; see {log_path}")
        self.timings[label] = round(time.perf_counter() - started, 1)
        self.log(f"[bench] {label}: done in {self.timings[label]:.0f} s")

    def label_cases(self, cases_path: Path, base_url: str) -> None:
        """Teacher (one sample per case) and soft labels on the answers it kept, against the known teacher."""
        s1, s2, where = self.recipe.stage1, self.recipe.stage2, layout_of(self.recipe)
        url = (f"client.base_url={base_url}",)
        teacher = StageCommand("teacher", str(resolve_path(s1.teacher)), (), (*s1.teacher_set, *url))
        self._run("teacher", teacher.argv("--input", str(cases_path), "--out", str(where.teacher)))
        soft = StageCommand("softlabels", str(resolve_path(s2.softlabels)), (), (*s2.softlabels_set, *url))
        self._run("softlabels", soft.argv("--input", str(cases_path), "--answers", str(where.teacher),
                                          "--out", str(where.stage2 / "softlabels")))

    def sft_command(self, output: Path, extra: Sequence[str] = ()) -> StageCommand:
        s1, where = self.recipe.stage1, layout_of(self.recipe)
        paths = [item.replace(DATA_KEY, "bench") for item in sft_paths(where)]
        paths[0:2] = [path_override("output_dir", output), path_override("dataset_prepared_path", output / "prepared")]
        return StageCommand("sft", str(resolve_path(s1.sft)), tuple(str(resolve_path(o)) for o in s1.sft_overlays),
                            (*s1.sft_set, *self.sft_set, *extra, *paths))

    def distill_command(self, output: Path, start: Path, overlays: Sequence[str], seed: int) -> StageCommand:
        s2, where = self.recipe.stage2, layout_of(self.recipe)
        every = [*s2.distill_overlays, *overlays]
        return StageCommand("distill", str(resolve_path(s2.distill)), tuple(str(resolve_path(o)) for o in every),
                            (*s2.distill_set, *self.distill_set, f"seed={seed}",
                             path_override("dataset_path", where.stage2 / "softlabels"),
                             path_override("output_dir", output), path_override("model_name_or_path", start)))

    def stage_two_steps(self) -> int:
        s2 = self.recipe.stage2
        composed = compose(str(resolve_path(s2.distill)), [str(resolve_path(o)) for o in s2.distill_overlays],
                           [*s2.distill_set, *self.distill_set])
        return int(composed["max_steps"])

    def runs(self, stage1: Path) -> list[Run]:
        """SFT continued and KD, SEEDS seeds each, then the two KD variants with the first seed."""
        runs = []
        for seed in range(FIRST_SEED, FIRST_SEED + self.seeds):
            out = self.out / f"sft_more-s{seed}"
            runs.append(Run("sft_more", seed, self.distill_command(out, stage1, (SFT_OVERLAY,), seed), out,
                            out / "merged"))
            out = self.out / f"kd-s{seed}"
            runs.append(Run("kd", seed, self.distill_command(out, stage1, (), seed), out, out / "merged"))
        for name, overlay in (("kd_tail", TAIL_OVERLAY), ("kd_weighted", WEIGHTED_OVERLAY)):
            out = self.out / f"{name}-s{FIRST_SEED}"
            runs.append(Run(name, FIRST_SEED, self.distill_command(out, stage1, (overlay,), FIRST_SEED), out,
                            out / "merged"))
        return runs

    # ---- the whole benchmark -----------------------------------------------------------------------------------
    def held_out(self, cases: list[Case]) -> list[Case]:
        valid = {row["id"] for row in read_jsonl(layout_of(self.recipe).valid_reference)}
        return [case for case in cases if case.id in valid]

    def evaluate(self, name: str, model_dir: Path, cases: list[Case]) -> float:
        started = time.perf_counter()
        accuracy = greedy_accuracy(model_dir, cases, self.prompts, self.table)
        self.timings[f"eval-{name}"] = round(time.perf_counter() - started, 1)
        self.log(f"[bench] {name}: accuracy {accuracy:.3f} on {len(cases)} held-out cases")
        return accuracy

    def run(self) -> dict[str, Any]:
        """Label, train, evaluate; the figures (also written to OUT/bench.json).

        Long because it is the benchmark's one sequence (cases, teacher, stage one, the runs, the figures),
        each step a call."""
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        cases = short_cases(self.recipe.train_cases, self.table, self.limit)
        cases_path = self.out / "cases.jsonl"
        write_jsonl_atomic(cases_path, [{"id": c.id, "feature_content": c.feature_content} for c in cases])
        with known_teacher_server() as server:
            self.label_cases(cases_path, server.base_url)
        held = self.held_out(cases)
        stage1 = self.out / "stage1" / "sft"
        shutil.rmtree(stage1, ignore_errors=True)
        self._run("stage1", self.sft_command(stage1).argv())
        accuracy: dict[str, list[float]] = {"base": [self.evaluate("base", Path(resolve_model(self.recipe.base_model)),
                                                                   held)],
                                            "stage1": [self.evaluate("stage1", stage1, held)]}
        losses: dict[str, dict[str, float]] = {"stage1": last_losses(stage1)}
        for run in self.runs(stage1):
            shutil.rmtree(run.output, ignore_errors=True)
            self._run(run.label, run.command.argv())
            accuracy.setdefault(run.name, []).append(self.evaluate(run.label, run.model_dir, held))
            losses[run.label] = last_losses(run.output)
        majority = max((sum(self.table.top_disease(c.feature_content) == d for c in held) for d in self.table.diseases),
                       default=0) / max(len(held), 1)
        figures = {"cases": len(cases), "held_out": len(held), "majority_class": round(majority, 3),
                   "seeds": self.seeds, "stage_two_steps": self.stage_two_steps(), "accuracy": accuracy,
                   "mean": {name: round(statistics.fmean(values), 3) for name, values in accuracy.items()},
                   "spread": {name: round(max(values) - min(values), 3) for name, values in accuracy.items()},
                   "last_losses": losses, "timings_s": self.timings,
                   "wall_s": round(time.perf_counter() - started, 1)}
        (self.out / "bench.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False), encoding="utf-8")
        return figures


def report(figures: dict[str, Any]) -> list[str]:
    """The table and, last, the one-line summary."""
    lines = [f"cases {figures['cases']}, held out {figures['held_out']} (majority class {figures['majority_class']}), "
             f"stage two {figures['stage_two_steps']} steps, {figures['wall_s']:.0f} s in all",
             f"{'run':<12} {'mean':>6} {'spread':>7}  per seed"]
    for name in LAST_LINE_KEYS:
        values = figures["accuracy"].get(name, [])
        lines.append(f"{name:<12} {figures['mean'].get(name, float('nan')):>6.3f} {figures['spread'].get(name, 0):>7.3f}  "
                     + " ".join(f"{v:.3f}" for v in values))
    lines.append(" ".join(f"acc_{name}={figures['mean'].get(name, float('nan')):.3f}" for name in LAST_LINE_KEYS)
                 + f" seeds={figures['seeds']}")
    return lines
