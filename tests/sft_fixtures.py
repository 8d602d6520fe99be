"""Chat datasets in prep.teacher's layout for the SFT tests, built by the same code path it uses.

Rows are {"id", "messages": [system, user, assistant], "agreement"} with messages from
prep.prompts.load_prompts().messages(case, Answer(...)): the assistant turn is answer_json's
canonical JSON, exactly what prep.teacher writes to <run>/teacher/sft/{train,valid}.jsonl.
"""
from __future__ import annotations

from pathlib import Path

from prep.answers import Answer
from prep.jsonio import write_jsonl_atomic
from prep.prompts import load_prompts
from prep.records import Case, read_cases

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CASES = REPO_ROOT / "data" / "sample_cases.jsonl"

# Hand-written answers in the official style (numbered reasons citing the case; one or more diseases).
_DISEASES = ["急性扁桃体炎", "社区获得性肺炎", "2型糖尿病", "急性阑尾炎", "高血压病3级", "缺铁性贫血",
             "急性胃肠炎", "腰椎间盘突出症", "急性胆囊炎", "支气管哮喘", "泌尿系感染", "偏头痛"]


def answer_for(case: Case, index: int) -> Answer:
    chief = next((line.split(":", 1)[1].strip() for line in case.feature_content.splitlines()
                  if line.startswith("主诉")), "症状")
    disease = _DISEASES[index % len(_DISEASES)]
    return Answer(reason=f"1. 主诉{chief}。2. 结合查体与辅助检查，符合{disease}表现。", diseases=disease)


def chat_rows(cases: list[Case], answers: list[Answer] | None = None, agreement: float = 1.0) -> list[dict]:
    prompts = load_prompts()
    answers = answers or [answer_for(case, index) for index, case in enumerate(cases)]
    return [{"id": case.id, "messages": prompts.messages(case, answer), "agreement": agreement}
            for case, answer in zip(cases, answers)]


def sample_cases(limit: int | None = None) -> list[Case]:
    cases = read_cases(SAMPLE_CASES).cases
    return cases[:limit] if limit else cases


def write_sft_split(teacher_dir: Path, train: list[dict], valid: list[dict]) -> tuple[Path, Path]:
    """Write <teacher_dir>/sft/train.jsonl and valid.jsonl (the layout the recipes' data keys name)."""
    sft = Path(teacher_dir) / "sft"
    sft.mkdir(parents=True, exist_ok=True)
    return write_jsonl_atomic(sft / "train.jsonl", train), write_jsonl_atomic(sft / "valid.jsonl", valid)


def write_sample_sft(teacher_dir: Path, n_train: int = 8, n_valid: int = 2) -> tuple[Path, Path]:
    """The first N_TRAIN sample cases as train, the next N_VALID as valid."""
    rows = chat_rows(sample_cases())
    return write_sft_split(teacher_dir, rows[:n_train], rows[n_train:n_train + n_valid])
