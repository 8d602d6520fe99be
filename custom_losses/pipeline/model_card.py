"""The final model's card: the README.md a pipeline run writes into the model folder its submission was predicted
with (the folder a user ships), saying where the model came from.

Everything in it is read from what the run recorded: the steps' stamps (OUT/stamps/<step>.json: each step's content
key), the run records of the model folders (prep.digests.RUN_RECORD: what was merged onto what, what trained it),
the API stages' summary.json (the teacher's model and endpoints), the score step's scores/scores.md, and the plan
itself (each step's recipe, overlays and overrides, composed here as the step composed them). It is written at the
end of every run whose submission step is up to date and re-written whenever its content changes (a retrained final
model, new scores); README.md is not a model file (prep.digests.MODEL_FILE_SUFFIXES), so writing it changes no
model digest and no step key. Secrets never reach it: recipe values under key-like names are masked and URLs lose
any user:password@ and query string (validated recipes hold neither; the card does not rely on it).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from custom_losses.pipeline.plan import Layout, PipelineRecipe, layout_of
from custom_losses.pipeline.steps import Decision, label
from prep.digests import RUN_RECORD, DigestCache, read_record, why_not_current
from prep.jsonio import InputError, iter_json_lines, write_text_atomic
from prep.records import read_cases

CARD_NAME = "README.md"
WRITTEN = "Card written: "        # the one line left out when deciding whether the card changed
# Recipe keys whose string values may be secrets (an `api_key_env` or `api_key_file` names where a key is, not it).
_SECRET_WORDS = ("api_key", "secret", "password", "passwd", "hub_token", "access_token", "auth_token")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_URL_QUERY = re.compile(r"(?P<url>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)[?#]\S*")


def final_model(decisions: list[Decision]) -> tuple[Decision, Path] | None:
    """The predict step whose answers became the submission, and the model folder it served; None without a
    submission step (a run stopped with --until)."""
    by_name = {decision.step.name: decision for decision in decisions}
    submission = by_name.get("submission")
    predict = by_name.get(submission.step.deps[0]) if submission and submission.step.deps else None
    if predict is None or "--model" not in predict.step.argv:
        return None
    return predict, Path(predict.step.argv[predict.step.argv.index("--model") + 1])


def write_model_card(recipe: PipelineRecipe, decisions: list[Decision]) -> Path | None:
    """OUT's final model folder's README.md (its path), written when the run's submission is up to date; None when
    it is not (or the plan has no submission step). Unchanged content is not re-written."""
    found = final_model(decisions)
    out = layout_of(recipe).out
    submission = next((d for d in decisions if d.step.name == "submission"), None)
    if found is None or submission is None or not found[1].is_dir():
        return None
    if why_not_current(out / "stamps" / "submission.json", submission.parts) is not None:
        return None
    path = found[1] / CARD_NAME
    text = model_card(recipe, decisions)
    if path.is_file():
        old = path.read_text(encoding="utf-8", errors="replace")
        if _without_date(old) == _without_date(text):
            return path
    write_text_atomic(path, text)
    return path


def _without_date(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith(WRITTEN)]


# --------------------------------------------------------------------------- the card

def model_card(recipe: PipelineRecipe, decisions: list[Decision]) -> str:
    """The card's Markdown for RECIPE's run as DECISIONS planned it (read from the run folder's records)."""
    where = layout_of(recipe)
    predict, model = final_model(decisions) or (None, None)
    if predict is None or model is None:
        raise ValueError("the plan has no submission step, so no final model")
    maker = _maker(decisions, model)
    chain = _upstream(decisions, maker.step.name if maker else predict.step.name)
    lines = [f"# {model.name}: a medkd student model", "",
             f"The model that answered `{where.out / 'submission.jsonl'}` (step `{predict.step.name}`), made by the "
             f"medkd pipeline (`python -m launch.pipeline`) in `{where.out}`.", "",
             f"{WRITTEN}{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "## Where it came from", "",
             f"- Base model (the untuned student): `{safe(recipe.base_model)}`",
             f"- Made by step `{maker.step.name if maker else '?'}`; the steps it comes from, in order: "
             + " → ".join(f"`{name}`" for name in chain), ""]
    lines += _lineage(model)
    lines += ["", "## Teachers", ""] + (_teachers(decisions) or ["- none recorded (the teacher steps' summaries are "
                                                                 "missing)"])
    lines += ["", "## Data", ""] + _data(where, decisions)
    lines += ["", "## Content keys", "",
              "Each step's key is the digest of everything its output depends on (its composed recipe, the content of "
              "what it reads, its upstream steps' keys, its code); the stamps under `stamps/` hold every part.", "",
              f"- Final model: `{_stamp_key(where.out, maker) if maker else '?'}` (step "
              f"`{maker.step.name if maker else '?'}`)",
              f"- Submission: `{_stamp_key(where.out, _named(decisions, 'submission'))}`", "",
              "| step | command | recipe | overlays | --set | key | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [_step_row(where.out, decision) for decision in decisions]
    lines += ["", "## Scores", ""] + _scores(where.out)
    lines += ["", "## Composed recipes", "",
              "Each stage step's recipe as the step composed it (overlays, then `--set`; secrets masked):", ""]
    for decision in decisions:
        if decision.step.recipe is not None:
            composed = json.dumps(masked(decision.step.recipe.composed()), indent=1, ensure_ascii=False, default=str)
            lines += [f"<details><summary>{decision.step.name}: {label(Path(decision.step.recipe.recipe))}"
                      f"</summary>", "", "```json", composed, "```", "", "</details>", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _named(decisions: list[Decision], name: str) -> Decision | None:
    return next((decision for decision in decisions if decision.step.name == name), None)


def _maker(decisions: list[Decision], model: Path) -> Decision | None:
    """The step that wrote MODEL (its config.json is one of the step's outputs)."""
    return next((decision for decision in decisions if model / "config.json" in decision.step.outputs), None)


def _upstream(decisions: list[Decision], name: str) -> list[str]:
    """NAME and every step it depends on, directly or not, in the plan's order."""
    deps = {decision.step.name: decision.step.deps for decision in decisions}
    wanted, pending = set(), [name]
    while pending:
        step = pending.pop()
        if step not in wanted and step in deps:
            wanted.add(step)
            pending += deps[step]
    return [decision.step.name for decision in decisions if decision.step.name in wanted]


def _stamp_key(out: Path, decision: Decision | None) -> str:
    """The key the step's stamp recorded (the key it ran under), or the planned key when it has no stamp."""
    if decision is None:
        return "?"
    record = read_record(out / "stamps" / f"{decision.step.name}.json") or {}
    return str(record.get("key") or decision.key)


def _step_row(out: Path, decision: Decision) -> str:
    step, record = decision.step, read_record(out / "stamps" / f"{decision.step.name}.json") or {}
    command = step.module.removeprefix("launch.")
    recipe = step.recipe
    cells = [f"`{step.name}`", command, f"`{label(Path(recipe.recipe))}`" if recipe else "",
             ", ".join(f"`{label(Path(overlay))}`" for overlay in recipe.overlays) if recipe else "",
             ", ".join(f"`{safe(item)}`" for item in recipe.overrides) if recipe else "",
             f"`{record.get('key') or decision.key}`" + ("" if record.get("done") else " (not finished)"),
             str(record.get("seconds", ""))]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _lineage(model: Path) -> list[str]:
    """What each model folder on the way was made of, from its run record: merged or copied onto which base, from
    which trained weights, trained under which recorded identity; down to a folder without a record (the base)."""
    lines, folder, seen = ["Lineage (each folder's `" + RUN_RECORD + "`):", ""], model, set()
    while folder.is_dir() and folder not in seen:
        seen.add(folder)
        identity = (read_record(folder) or {}).get("identity")
        if not isinstance(identity, dict):
            lines.append(f"- `{folder}`: no run record (the base model)")
            break
        source = Path(str(identity.get("source", "")))
        lines.append(f"- `{folder}`: {identity.get('kind', '?')} model from `{source}` (trained weights "
                     f"`{identity.get('trained weights', '?')}`) onto `{identity.get('base_model', '?')}`, dtype "
                     f"{identity.get('dtype', '?')}")
        trained = next((read_record(path) for path in (source, source.parent) if (path / RUN_RECORD).is_file()), None)
        if trained and isinstance(trained.get("identity"), dict):
            parts = {key: value for key, value in trained["identity"].items() if key != "recipe"}
            recipe = trained["identity"].get("recipe")
            said = f"{len(recipe)} recipe keys" if isinstance(recipe, dict) else f"recipe digest `{recipe}`"
            lines.append(f"  - trained under {said}" + "".join(f"; {key}: `{safe(str(value))}`"
                                                             for key, value in sorted(parts.items()))
                         + ("" if trained.get("done") else " (the training record says not finished)"))
        folder = Path(str(identity.get("base_model", "")))
    return lines


def _teachers(decisions: list[Decision]) -> list[str]:
    """One line per teacher or soft-label step: the model asked, how it is known, the endpoints' base URLs."""
    lines = []
    for decision in decisions:
        step = decision.step
        if step.recipe is None or step.recipe.folder not in ("teacher", "softlabels") or "--out" not in step.argv:
            continue
        summary_path = Path(step.argv[step.argv.index("--out") + 1]) / "summary.json"
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            lines.append(f"- `{step.name}`: no summary at `{summary_path}`")
            continue
        identity = summary.get("model_identity") or {}
        urls = sorted({counts.get("base_url") for counts in (summary.get("endpoints") or {}).values()
                       if isinstance(counts, dict) and counts.get("base_url")} or {summary.get("base_url") or "?"})
        server = step.recipe.composed().get("server")
        served = f"; self-hosted: the step started vLLM from `{safe(str(server))}`" if isinstance(server, str) else \
            ("; self-hosted: the step started vLLM (inline `server:`)" if server else "")
        lines.append(f"- `{step.name}` ({step.recipe.folder}): model `{safe(str(summary.get('model')))}`, identity "
                     f"`{safe(str(identity.get('identity', '?')))}` (known by {identity.get('known_by', '?')}); "
                     f"endpoint(s) {', '.join(f'`{safe(str(url))}`' for url in urls)}{served}")
    return lines


def _data(where: Layout, decisions: list[Decision]) -> list[str]:
    """The case files (records, content digest) and the teacher's SFT files (rows) the run read or made."""
    cache = DigestCache(where.out / "stamps" / "digests.json")
    lines = ["| file | role | records | sha256 |", "|---|---|---|---|"]
    for role, path in (("train_cases", where.train_cases), ("test_cases", where.test_cases)):
        try:
            count, digest = str(len(read_cases(path).cases)), cache.file(path)
        except (InputError, OSError) as err:
            count, digest = f"unreadable ({err})", "?"
        lines.append(f"| `{path}` | {role} | {count} | `{digest}` |")
    for role, path in (("teacher answers, training rows", where.teacher / "sft" / "train.jsonl"),
                       ("teacher answers, held out (the score's reference)", where.valid_reference)):
        if path.is_file():
            lines.append(f"| `{path}` | {role} | {_rows(path)} | `{cache.file(path)}` |")
    files = _read_files(where.out, decisions, {label(where.train_cases), label(where.test_cases)})
    if files:
        lines += ["", "Other files the steps read (prompts, chat template, lexicon, serve recipes, a local base "
                      "model), with the digests their stamps recorded:", ""]
        lines += [f"- `{name}`: `{digest}`" for name, digest in sorted(files.items())]
    return lines


def _rows(path: Path) -> str:
    try:
        return str(sum(1 for _ in iter_json_lines(path)))
    except InputError as err:
        return f"unreadable ({err})"


def _read_files(out: Path, decisions: Iterable[Decision], cases: set[str]) -> dict[str, str]:
    """`file:` parts of the steps' stamps (what each step read from outside the run folder), the CASES aside."""
    files: dict[str, str] = {}
    for decision in decisions:
        identity = (read_record(out / "stamps" / f"{decision.step.name}.json") or {}).get("identity") or {}
        for name, digest in identity.items():
            if name.startswith("file:") and name.removeprefix("file:") not in cases:
                files[name.removeprefix("file:")] = str(digest)
    return files


def _scores(out: Path) -> list[str]:
    """The score table the score step wrote (scores/scores.md's table), and where the full report is."""
    path = out / "scores" / "scores.md"
    if not path.is_file():
        return [f"No score table at `{path}`."]
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    table = [line for line in text if line.startswith("|")]
    head = next((line.lstrip("# ") for line in text if line.startswith("# ")), "")
    return ([head, ""] if head else []) + table + ["", f"The full report (metrics, curves): `{path}`."]


# --------------------------------------------------------------------------- secrets

def _secret_name(key: str) -> bool:
    key = key.lower()
    return any(word in key for word in _SECRET_WORDS) and not key.endswith(("_env", "_file"))


def safe(text: str) -> str:
    """TEXT with any URL's user:password@ and query string removed, and `key=value` overrides of secret-like
    keys masked."""
    key, sep, value = text.partition("=")
    if sep and "://" not in key and _secret_name(key.rsplit(".", 1)[-1]):
        return f"{key}=***"
    return _URL_QUERY.sub(r"\g<url>", _URL_CREDENTIALS.sub(r"\g<scheme>", text))


def masked(value: Any, key: str = "") -> Any:
    """A composed recipe with the string values of secret-like keys masked and URLs made safe (safe)."""
    if isinstance(value, dict):
        return {name: masked(item, str(name)) for name, item in value.items()}
    if isinstance(value, list):
        return [masked(item, key) for item in value]
    if isinstance(value, str):
        return "***" if _secret_name(key) and value else safe(value)
    return value
