"""Local scorer: disease-set P/R/F1 (exact and fuzzy), reason ROUGE-L and JSON-format share against a reference.

The official metric is not public; this scores what it most likely rewards. The reference is a
JSONL of `{id, reason, diseases}` (e.g. teacher answers on a held-out split), or the teacher prep's
`sft/valid.jsonl` layout `{id, messages: [..., assistant answer JSON]}`. Predictions are
submissions or predict's `predictions.jsonl` (which adds `raw_valid`). Every reference case
counts: one missing from a prediction scores zero everywhere and is listed.

Its settings (ScoreSettings) come from a recipe, recipes/score/*.yaml; `python -m launch.score` is the command.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prep.answers import AnswerError, answer_from_object, normalise_diseases, parse_answer
from prep.config import load_recipe
from prep.eval.curves import read_curves, write_curves
from prep.eval.submission import id_list
from prep.jsonio import (
    InputError,
    iter_json_lines,
    parse_object_line,
    write_bytes_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from prep.records import case_id_of

GENERIC_STEMS = {"submission", "predictions", "prediction", "valid", "test"}
DEFAULT_RECIPE = "recipes/score/default.yaml"   # what launch.score and the pipeline's `score:` section use unless told


@dataclass
class ScoreSettings:
    """Scorer knobs: a recipe (recipes/score/*.yaml), the pipeline recipe's `score:` section, `--set key=value`."""

    keep_parentheticals: bool = True   # "原发性高血压（1级）" vs "原发性高血压": different names when true
    fuzzy_threshold: float = 0.5       # character Dice overlap at which two disease names count as the same

    def __post_init__(self) -> None:
        if not 0 < self.fuzzy_threshold <= 1:
            raise ValueError(f"fuzzy_threshold must be in (0, 1], got {self.fuzzy_threshold}")


def validate_recipe(path: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> ScoreSettings:
    """A score recipe composed with its overlays and `key=value` overrides -> ScoreSettings (RecipeError if bad)."""
    return load_recipe(ScoreSettings, path, list(overrides), overlays)


@dataclass(frozen=True)
class ScoredAnswer:
    reason: str
    diseases: str
    raw_valid: bool = True   # parsed as JSON before any repair (predict's cache says; a submission is valid)


@dataclass
class AnswerFile:
    path: str
    answers: dict[int, ScoredAnswer]
    problems: list[InputError] = field(default_factory=list)   # rows that could not be read (their ids score zero)


# ---------------------------------------------------------------- reading

def _answer_of_row(row: dict) -> ScoredAnswer:
    """One row in any supported layout -> ScoredAnswer, or AnswerError naming what is wrong."""
    raw_valid = row.get("raw_valid", row.get("format_ok", True))
    if not isinstance(raw_valid, bool):
        raise AnswerError(f"'raw_valid' must be true or false, got {json.dumps(raw_valid, ensure_ascii=False)}")
    if "reason" in row:
        answer = answer_from_object({key: row[key] for key in ("reason", "diseases") if key in row})
    elif "messages" in row:
        turns = [turn for turn in row["messages"] if isinstance(turn, dict) and turn.get("role") == "assistant"]
        if not turns:
            raise AnswerError("'messages' has no assistant turn holding the answer")
        answer = parse_answer(turns[-1].get("content", ""))
    elif "bingli_json" in row:
        # The early official example: the reason sits in a nested JSON string, the names in `diseases`.
        nested = parse_answer(row["bingli_json"])
        answer = answer_from_object({"reason": nested.reason, "diseases": row.get("diseases", nested.diseases)})
    elif "diseases" in row:
        raise AnswerError("the row has 'diseases' but no 'reason'")
    else:
        raise AnswerError("a row needs 'reason' and 'diseases', or 'messages' ending in an assistant answer")
    return ScoredAnswer(answer.reason, answer.diseases, raw_valid)


def load_answers(path: str | Path, strict: bool) -> AnswerFile:
    """Read answers keyed by id. STRICT (the reference): the first bad row raises InputError.
    Otherwise (a prediction) bad rows are collected as problems and their cases score zero."""
    result = AnswerFile(str(path), {})
    first_line: dict[int, int] = {}
    for number, text in iter_json_lines(path):
        try:
            row = parse_object_line(path, number, text)
            case_id = case_id_of(path, number, row.get("id"))
            if case_id in first_line:
                raise InputError(path, number, f"duplicate id {case_id} (first on line {first_line[case_id]})",
                                 field="id")
            first_line[case_id] = number
            try:
                result.answers[case_id] = _answer_of_row(row)
            except AnswerError as err:
                raise InputError(path, number, f"id {case_id}: {err}") from None
        except InputError as problem:
            if strict:
                raise
            result.problems.append(problem)
    if strict and not result.answers:
        raise InputError(path, None, "no answers in the reference file")
    return result


# ---------------------------------------------------------------- metrics

def char_dice(a: str, b: str) -> float:
    """Character overlap of two names: 2 * |common characters (with multiplicity)| / (|a| + |b|)."""
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common / (len(a) + len(b))


def prf(true_positives: int, predicted: int, reference: int) -> tuple[float, float, float]:
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / reference if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def exact_matches(predicted: list[str], reference: list[str]) -> int:
    return len(set(predicted) & set(reference))


def fuzzy_matches(predicted: list[str], reference: list[str], threshold: float) -> int:
    """One-to-one matches, most similar pairs first, so one predicted name never covers two references."""
    pairs = sorted(((char_dice(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)),
                   key=lambda pair: (-pair[0], pair[1], pair[2]))
    used_p, used_r, matched = set(), set(), 0
    for similarity, i, j in pairs:
        if similarity < threshold:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i), used_r.add(j)
            matched += 1
    return matched


def rouge_l_f1(hypothesis: str, reference: str) -> float:
    """Character-level ROUGE-L F1 via rouge-chinese: characters space-joined, whitespace dropped."""
    from rouge_chinese import Rouge

    hyp = " ".join(char for char in hypothesis if not char.isspace())
    ref = " ".join(char for char in reference if not char.isspace())
    if not hyp or not ref:
        return 0.0
    return Rouge(metrics=["rouge-l"], stats=["f"]).get_scores(hyp, ref)[0]["rouge-l"]["f"]


def score_case(prediction: ScoredAnswer | None, reference: ScoredAnswer, settings: ScoreSettings) -> dict:
    """Per-case numbers; a missing prediction scores zero everywhere (and counts as badly formatted)."""
    if prediction is None:
        return {"answered": False, "format_valid": 0.0, "reason_chars": 0,
                **{f"diseases_{kind}_{m}": 0.0 for kind in ("exact", "fuzzy") for m in ("p", "r", "f1")},
                "reason_rouge_l_f1": 0.0}
    pred_names = normalise_diseases(prediction.diseases, settings.keep_parentheticals)
    ref_names = normalise_diseases(reference.diseases, settings.keep_parentheticals)
    exact = prf(exact_matches(pred_names, ref_names), len(pred_names), len(ref_names))
    fuzzy = prf(fuzzy_matches(pred_names, ref_names, settings.fuzzy_threshold), len(pred_names), len(ref_names))
    return {
        "answered": True,
        "format_valid": float(prediction.raw_valid),
        "reason_chars": len(prediction.reason),
        **{f"diseases_exact_{m}": value for m, value in zip(("p", "r", "f1"), exact)},
        **{f"diseases_fuzzy_{m}": value for m, value in zip(("p", "r", "f1"), fuzzy)},
        "reason_rouge_l_f1": rouge_l_f1(prediction.reason, reference.reason),
    }


METRICS = ["diseases_exact_p", "diseases_exact_r", "diseases_exact_f1", "diseases_fuzzy_p", "diseases_fuzzy_r",
           "diseases_fuzzy_f1", "reason_rouge_l_f1", "format_valid"]


@dataclass
class RunScore:
    name: str
    path: str
    cases: int
    answered: int
    metrics: dict[str, float]              # means over every reference case
    reason_chars: dict[str, float]         # over answered cases: mean, p50, and mean ratio to the reference's
    missing_ids: list[int]
    extra_ids: list[int]                   # ids not in the reference (ignored)
    problems: list[str]
    per_case: list[dict]


def score_run(name: str, predictions: AnswerFile, reference: AnswerFile, settings: ScoreSettings) -> RunScore:
    per_case = [{"id": case_id, **score_case(predictions.answers.get(case_id), ref, settings)}
                for case_id, ref in reference.answers.items()]
    lengths = [len(predictions.answers[case_id].reason) for case_id in reference.answers
               if case_id in predictions.answers]
    ref_mean = statistics.fmean(len(ref.reason) for ref in reference.answers.values())
    return RunScore(
        name=name, path=predictions.path, cases=len(per_case),
        answered=sum(row["answered"] for row in per_case),
        metrics={metric: statistics.fmean(row[metric] for row in per_case) for metric in METRICS},
        reason_chars={"mean": statistics.fmean(lengths) if lengths else 0.0,
                      "p50": statistics.median(lengths) if lengths else 0.0,
                      "ratio_to_ref": (statistics.fmean(lengths) / ref_mean) if lengths else 0.0},
        missing_ids=[row["id"] for row in per_case if not row["answered"]],
        extra_ids=[case_id for case_id in predictions.answers if case_id not in reference.answers],
        problems=[str(problem) for problem in predictions.problems],
        per_case=per_case,
    )


# ---------------------------------------------------------------- reporting

COLUMNS = ["run", "cases", "missing"] + METRICS + ["reason_chars_mean", "reason_chars_p50", "reason_len_ratio"]


def table_rows(runs: list[RunScore]) -> list[dict]:
    return [{"run": run.name, "cases": run.cases, "missing": len(run.missing_ids),
             **{metric: round(run.metrics[metric], 4) for metric in METRICS},
             "reason_chars_mean": round(run.reason_chars["mean"], 1), "reason_chars_p50": run.reason_chars["p50"],
             "reason_len_ratio": round(run.reason_chars["ratio_to_ref"], 3)} for run in runs]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(row[column]) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_markdown(runs: list[RunScore], reference: AnswerFile, settings: ScoreSettings) -> str:
    ref_mean = statistics.fmean(len(ref.reason) for ref in reference.answers.values())
    parts = [f"# Local scores against {reference.path}\n",
             f"{len(reference.answers)} reference cases; reference reason length mean {ref_mean:.1f} chars. "
             f"Disease names normalised by prep.answers.normalise_diseases (keep_parentheticals="
             f"{settings.keep_parentheticals}); fuzzy = one-to-one name matches at character Dice >= "
             f"{settings.fuzzy_threshold}; P/R/F1 averaged over reference cases; reason = character ROUGE-L F1 "
             "(rouge-chinese); format_valid = share of reference cases answered with JSON that parsed before any "
             "repair. Missing cases score zero.\n", markdown_table(table_rows(runs))]
    for run in runs:
        notes = []
        if run.missing_ids:
            notes.append(f"- {len(run.missing_ids)} reference cases missing (scored zero): "
                         f"{id_list(run.missing_ids, 200)}")
        if run.extra_ids:
            notes.append(f"- {len(run.extra_ids)} ids not in the reference (ignored): {id_list(run.extra_ids, 200)}")
        notes += [f"- unreadable row: {problem}" for problem in run.problems]
        if notes:
            parts.append(f"\n## {run.name} ({run.path})\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def read_contamination(path: str | Path) -> dict:
    """A contamination report (prep.near_duplicates.contamination, as the pipeline writes it) for scores.md."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--contamination {path}: cannot read it as JSON ({err})") from None
    keys = ("test_cases", "exact_copies", "near_copies", "ngram", "threshold", "copies")
    if not isinstance(report, dict) or any(key not in report for key in keys):
        raise ValueError(f"--contamination {path}: not a contamination report (needs {', '.join(keys)})")
    return report


def contamination_markdown(report: dict) -> str:
    """The report's section: how many test cases copy a training case, and which."""
    test = report["test_cases"]
    share = (lambda count: f"{count / test:.1%}" if test else "0%")
    copies = report["copies"]
    listed = ", ".join(f"{row['test_id']} ~ {row['train_id']} ({'exact' if row['exact'] else row['jaccard']})"
                       for row in copies[:50])
    return (f"\n## Contamination: test cases that copy training cases\n"
            f"Of {test} test cases, {report['exact_copies']} ({share(report['exact_copies'])}) are exact copies of a "
            f"training case (same text once trimmed) and {report['near_copies']} ({share(report['near_copies'])}) "
            f"near copies (character {report['ngram']}-gram Jaccard >= {report['threshold']}): the model has "
            f"seen their answers, so its score on them overstates the unseen ones.\n"
            + (f"\ntest id ~ training id (Jaccard): {listed}{' ...' if len(copies) > 50 else ''}\n" if copies else ""))


def bar_chart(runs: list[RunScore], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["diseases_exact_f1", "diseases_fuzzy_f1", "reason_rouge_l_f1", "format_valid"]
    labels = ["diseases F1 (exact)", "diseases F1 (fuzzy)", "reason ROUGE-L F1", "valid JSON"]
    width = 0.8 / len(runs)
    figure, axes = plt.subplots(figsize=(2.2 * len(shown) + 1, 4.6))
    for index, run in enumerate(runs):
        xs = [position + (index - (len(runs) - 1) / 2) * width for position in range(len(shown))]
        bars = axes.bar(xs, [run.metrics[metric] for metric in shown], width, label=run.name)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(range(len(shown)), labels)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("score (mean over reference cases)")
    axes.set_title(f"Local scores on {len(runs[0].per_case)} cases")
    # Below the axes, so the legend never hides a bar at 1.0.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(runs), 4), fontsize=8, frameon=False)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    return write_bytes_atomic(path, image.getvalue())


def run_names(paths: list[str], names: list[str] | None) -> list[str]:
    """Labels from --names, else file stems (the folder's name for generic stems such as submission.jsonl)."""
    if names:
        if len(names) != len(paths):
            raise ValueError(f"--names gives {len(names)} names for {len(paths)} prediction files")
        return names
    labels = [Path(p).parent.name if Path(p).stem in GENERIC_STEMS and Path(p).parent.name else Path(p).stem
              for p in paths]
    counts = Counter(labels)
    seen: Counter = Counter()
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(f"{label}-{seen[label]}" if counts[label] > 1 else label)
    return unique


def score_files(reference_path: str | Path, prediction_paths: list[str], names: list[str] | None,
                settings: ScoreSettings, out_dir: str | Path | None,
                curves: dict[str, Path] | None = None, contamination: dict | None = None) -> list[RunScore]:
    """Score every prediction file; with OUT_DIR write scores.md/.csv/.png and per_case.jsonl there, and
    prep.eval.curves.curve_path(OUT_DIR, NAME) for each CURVES name: trainer_state.json or training folder.
    CONTAMINATION (read_contamination) adds its section to scores.md and its figures to scores.json."""
    labels = run_names(prediction_paths, names)
    reference = load_answers(reference_path, strict=True)
    predictions = [load_answers(path, strict=False) for path in prediction_paths]  # read all before scoring any
    histories = read_curves(curves or {})
    runs = [score_run(label, prediction, reference, settings) for label, prediction in zip(labels, predictions)]
    if out_dir is not None:
        out_dir = Path(out_dir)
        rows = table_rows(runs)
        written = write_curves(histories, out_dir)
        curve_links = "".join(f"\n![{name} training]({path.name})\n" for name, path in written.items())
        curve_section = f"\n## Training curves\n{curve_links}" if written else ""
        copied = contamination_markdown(contamination) if contamination else ""
        write_text_atomic(out_dir / "scores.md", report_markdown(runs, reference, settings) + copied + curve_section)
        write_text_atomic(out_dir / "scores.csv", csv_text(rows))
        write_jsonl_atomic(out_dir / "per_case.jsonl",
                           ({"run": run.name, **case} for run in runs for case in run.per_case))
        write_text_atomic(out_dir / "scores.json", json.dumps(
            {"reference": str(reference_path), "settings": asdict(settings), "table": rows,
             "missing_ids": {run.name: run.missing_ids for run in runs},
             **({"contamination": {key: value for key, value in contamination.items() if key != "copies"}}
                if contamination else {})}, ensure_ascii=False, indent=1) + "\n")
        bar_chart(runs, out_dir / "scores.png")
    return runs


def replace_section(report: str | Path, heading: str, body: str) -> None:
    """REPORT (a scores.md) with its `## HEADING` section set to BODY: replaced where it is (up to the next `## `),
    else added at the end. The pipeline adds its cost table this way after its last step, so a re-run that skips
    the score step still gets this run's figures."""
    path = Path(report)
    text = path.read_text(encoding="utf-8")
    title = f"## {heading}\n"
    start = text.find(title)
    section = f"{title}\n{body.rstrip()}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    write_text_atomic(path, text)


def console_report(runs: list[RunScore]) -> str:
    """The table, then one line per missing set of cases and per unreadable row, for a terminal."""
    lines = [markdown_table(table_rows(runs)).rstrip("\n")]
    for run in runs:
        if run.missing_ids:
            lines.append(f"{run.name}: {len(run.missing_ids)} reference cases missing, scored zero: "
                         f"{id_list(run.missing_ids)}")
        lines += [f"{run.name}: unreadable row, scored zero: {problem}" for problem in run.problems]
    return "\n".join(lines) + "\n"
