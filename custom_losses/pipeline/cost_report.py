"""A run's cost in words: the estimate's table (the plan, and the terminal before the first paid step), the budget's
refusal, each step's actuals in its stamp, OUT/cost.json, the "Cost" section of scores.md and the run's last lines.

Actuals per step (stamps/<step>.json, key `actual`): the wall time, the GPUs it used (a trainer: the GPUs visible
to the pipeline, as the launcher starts one process each; a self-hosted server: its serve recipe's, at most those
visible), GPU-hours, and from an API step's summary.json the requests and tokens the client counted (repairs and
retries included); a trainer's tokens when its trainer_state.json counts them (num_input_tokens_seen).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from custom_losses.pipeline.cost import Budget, Estimator, RunEstimate, StepCost
from custom_losses.pipeline.steps import Decision, PipelineError
from prep.digests import read_record, write_record
from prep.eval.score import replace_section
from prep.jsonio import write_text_atomic

COST_FILE = "cost.json"           # under OUT: the estimate, the actuals, the totals
SECTION = "Cost: estimated and actual"
API_STEPS = ("teacher", "softlabels", "predict", "student")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count(value: int) -> str:
    return f"{value / 1e6:.2f}M" if value >= 10**6 else f"{value:,}"


def estimate_lines(estimate: RunEstimate) -> list[str]:
    """The estimate as the plan prints it: the assumptions, one row per step, the total."""
    width = max(len(step.step) for step in estimate.steps)
    head = (f"{'step':<{width}}  {'requests':>8}  {'prompt':>8}  {'complete':>8}  {'train':>8}  {'GPUs':>4}  "
            f"{'GPU-h':>7}  {'wall':>9}  {'USD':>9}  how")
    lines = [*estimate.assumptions, head]
    for step in [*estimate.steps, estimate.total()]:
        gpu_hours = estimate.gpu_hours if step.step == "total" else step.gpu_hours
        if not step.runs:
            lines.append(f"{step.step:<{width}}  (skipped: up to date)")
            continue
        lines.append(f"{step.step:<{width}}  {step.requests:>8,}  {count(step.prompt_tokens):>8}  "
                     f"{count(step.completion_tokens):>8}  {count(step.train_tokens):>8}  {step.gpus:>4}  "
                     f"{gpu_hours:>7.2f}  {duration(step.wall_s):>9}  {step.usd:>9,.2f}  {step.how}")
    return lines


def check_budget(budget: Budget, estimate: RunEstimate) -> None:
    """PipelineError (exit 2) when the estimate passes budget.max_usd or budget.max_gpu_hours, naming the biggest
    steps, before any step starts."""
    total = estimate.total()
    over = [(key, limit, value, unit) for key, limit, value, unit in
            (("max_usd", budget.max_usd, total.usd, "USD"), ("max_gpu_hours", budget.max_gpu_hours,
                                                             estimate.gpu_hours, "GPU-hours"))
            if limit is not None and value > limit]
    if not over:
        return
    key, limit, value, unit = over[0]
    measure = (lambda step: step.usd) if unit == "USD" else (lambda step: step.gpu_hours)
    biggest = sorted(estimate.running, key=measure, reverse=True)[:3]
    named = ", ".join(f"{step.step} {measure(step):,.2f}" for step in biggest)
    raise PipelineError(f"the estimate of this run, {value:,.2f} {unit}, is over budget.{key} {limit:g} (biggest "
                        f"steps, {unit}: {named}); raise it (--set budget.{key}=N) or run less (--stages 1, "
                        f"--until STEP, --limit N)")


# --------------------------------------------------------------------------- actuals

def step_summary(decision: Decision) -> dict[str, Any]:
    """An API step's summary.json (beside its --out), {} for other steps."""
    argv = decision.step.argv
    if decision.step.name.split("-")[0] not in API_STEPS or "--out" not in argv:
        return {}
    try:
        return json.loads((Path(argv[argv.index("--out") + 1]) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def trained_tokens(decision: Decision) -> int:
    """The tokens a trainer counted (num_input_tokens_seen of its last trainer_state.json), 0 when it did not."""
    argv = decision.step.argv
    output = next((item.split("=", 1)[1].strip('"') for item in argv if item.startswith("output_dir=")), None)
    if output is None:
        return 0
    states = sorted(Path(output).glob("**/trainer_state.json"), key=lambda path: path.stat().st_mtime)
    if not states:
        return 0
    try:
        return int(json.loads(states[-1].read_text(encoding="utf-8")).get("num_input_tokens_seen") or 0)
    except (OSError, ValueError):
        return 0


def actual_cost(estimator: Estimator, decision: Decision, row: dict[str, Any], visible: int) -> StepCost:
    """What step ROW (a pipeline summary row) did: its time, GPUs (VISIBLE to the pipeline), requests, tokens."""
    name, kind = decision.step.name, decision.step.name.split("-")[0]
    summary = step_summary(decision)
    # A server the pipeline started for this step (and those after it that share it) started before the step's own
    # seconds: the row's server_start_s less what the step started itself (its summary's), added to its time.
    started = float(row.get("server_start_s", 0.0) or 0.0)
    own = float(summary.get("server_start_s") or 0.0) if summary.get("server_started") else 0.0
    cost = StepCost(name, requests=int(summary.get("requests") or 0), prompt_tokens=int(summary.get("tokens_in") or 0),
                    completion_tokens=int(summary.get("tokens_out") or 0),
                    wall_s=float(row["seconds"]) + max(started - own, 0.0), server_start_s=started)
    prompt_price = completion_price = 0.0
    if kind in ("sft", "distill"):
        cost.gpus, cost.train_tokens = visible, trained_tokens(decision)
    elif summary and decision.step.recipe:
        served = estimator.served(decision.step.recipe.composed())
        if served.kind == "self-hosted":
            cost.gpus = min(served.gpus, visible) if visible else 0
        elif served.kind == "hosted":
            prompt_price, completion_price = estimator.hosted_price(served.model)
    cost.usd = ((cost.prompt_tokens * prompt_price + cost.completion_tokens * completion_price) / 1e6
                + visible * cost.wall_s / 3600 * estimator.prices.gpu_hour_usd)
    return cost


def record_actuals(recipe: Any, decisions: list[Decision], summary: list[dict[str, Any]], stamps: Path,
                   limit: int | None) -> list[StepCost]:
    """Each step that ran: its actuals, written into its stamp (key `actual`, beside its identity); the list."""
    from custom_losses.train.launcher import visible_gpus

    estimator, visible = Estimator(recipe, limit), visible_gpus()
    by_name = {decision.step.name: decision for decision in decisions}
    actuals = []
    for row in summary:
        if row.get("status") != "ran" or row["step"] not in by_name:
            continue
        cost = actual_cost(estimator, by_name[row["step"]], row, visible)
        actuals.append(cost)
        path = stamps / f"{row['step']}.json"
        record = read_record(path)
        if record is not None:
            extra = {key: value for key, value in record.items() if key not in ("identity", "done", "actual")}
            kept = {key: value for key, value in cost.as_json().items() if key not in ("how", "runs", "step")}
            write_record(path, record["identity"], done=bool(record.get("done")), **extra, actual=kept)
    return actuals


# --------------------------------------------------------------------------- the report

def cell(cost: StepCost | None, trains: bool = False) -> str:
    """Time, GPU-hours, tokens (API: prompt + completion; a trainer's: trained, when counted) and money."""
    if cost is None:
        return "-"
    api = cost.prompt_tokens + cost.completion_tokens
    tokens = [f"{count(api)} API tokens"] if api or not trains else []
    if trains:
        tokens.append(f"{count(cost.train_tokens)} trained tokens" if cost.train_tokens else "trained tokens not counted")
    return f"{duration(cost.wall_s)}, {cost.gpu_hours:.2f} GPU-h, {', '.join(tokens)}, ${cost.usd:,.2f}"


def cost_rows(estimate: RunEstimate, actuals: list[StepCost]) -> list[str]:
    """Markdown rows: step | estimated | actual, for the steps that ran, then the totals."""
    actual = {cost.step: cost for cost in actuals}
    rows = ["| step | estimated | actual |", "|---|---|---|"]
    ran = [step for step in estimate.running if step.step in actual]
    for step in ran:
        trains = step.step.split("-")[0] in ("sft", "distill")
        rows.append(f"| {step.step} | {cell(step, trains)} | {cell(actual[step.step], trains)} |")
    est = sum_costs("total", ran)
    rows.append(f"| total | {cell(est, True)} | {cell(sum_costs('total', list(actual.values())), True)} |")
    return rows


def cost_table(estimate: RunEstimate, actuals: list[StepCost]) -> str:
    """The scores.md section: cost_rows and where the estimate's figures came from."""
    said = "; ".join(line.removeprefix("assumptions: ") for line in estimate.assumptions)
    return "\n".join(cost_rows(estimate, actuals)) + (f"\n\nEstimated before the run (custom_losses.pipeline.cost; docs/COST.md), from {said}. "
                              "A step's time includes the server the pipeline started for it; the preflight is left "
                              "out. Trainers count their tokens only when their recipe asks them to "
                              "(include_num_input_tokens_seen).\n")


def sum_costs(name: str, costs: list[StepCost]) -> StepCost:
    """The sum of COSTS; its gpus are GPU-hours' weights, so the sum keeps GPU-hours right through wall_s."""
    wall = sum(cost.wall_s for cost in costs)
    total = StepCost(name, requests=sum(c.requests for c in costs), prompt_tokens=sum(c.prompt_tokens for c in costs),
                     completion_tokens=sum(c.completion_tokens for c in costs),
                     train_tokens=sum(c.train_tokens for c in costs), wall_s=wall, usd=sum(c.usd for c in costs))
    total.gpus = sum(c.gpu_hours for c in costs) * 3600 / wall if wall else 0   # a mean, so gpu_hours sums
    return total


def write_report(out: Path, estimate: RunEstimate, actuals: list[StepCost], summary: list[dict[str, Any]],
                 wall_s: float) -> dict[str, Any]:
    """OUT/cost.json and the Cost section of OUT/scores/scores.md (when the score step wrote it); the totals."""
    ran = {row["step"] for row in summary if row.get("status") == "ran"}
    totals = {"server_starts": sum(int(row.get("server_starts", 0) or 0) for row in summary),
              "server_start_s": round(sum(float(row.get("server_start_s", 0.0) or 0.0) for row in summary), 1),
              "wall_s": round(wall_s, 1),
              "estimated_wall_s": round(estimate.preflight_s + sum(s.wall_s for s in estimate.running
                                                                   if s.step in ran), 1)}
    actual_total = sum_costs("total", actuals)
    report = {"estimate": estimate.as_json(), "actual": [cost.as_json() for cost in actuals],
              "table": cost_rows(estimate, actuals),
              "actual_total": {**actual_total.as_json(), "gpu_hours": round(actual_total.gpu_hours, 4)}, **totals}
    write_text_atomic(out / COST_FILE, json.dumps(report, indent=1) + "\n")
    scores = out / "scores" / "scores.md"
    if scores.is_file():
        replace_section(scores, SECTION, cost_table(estimate, actuals))
    return report


def final_lines(out: Path) -> list[str]:
    """The run's last lines on cost: the step | estimated | actual table, the totals in words, then
    server_starts=N server_start_s=S wall_s=T estimated_wall_s=E (from OUT/cost.json; none when it is absent)."""
    try:
        report = json.loads((out / COST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    est, act = report["estimate"]["total"], report["actual_total"]

    def words(total: dict[str, Any]) -> str:
        tokens = total["prompt_tokens"] + total["completion_tokens"] + total["train_tokens"]
        return f"{duration(total['wall_s'])}, {total['gpu_hours']:.2f} GPU-h, {count(tokens)} tokens, ${total['usd']:,.2f}"

    return [*report.get("table", []),
            f"cost: estimated {words(est)}; actual {words(act)} (the steps that ran; {out / COST_FILE})",
            f"server_starts={report['server_starts']} server_start_s={report['server_start_s']:g} "
            f"wall_s={report['wall_s']:g} estimated_wall_s={report['estimated_wall_s']:g}"]
