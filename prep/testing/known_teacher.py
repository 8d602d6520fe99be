"""A teacher whose answers are known: an OpenAI-compatible server whose answer distribution is a stated
function of the case, with the exact next-token log-probabilities of that distribution.

The table (data/known_teacher/findings.json) maps chief-complaint terms to two or three candidate diagnoses:
the first rule with a term in the case's `主诉` line decides (the whole user turn when it has no such line;
the table's fallback when no rule matches). Each candidate is one answer in the project's JSON format
(prep.answers.answer_json), its reason templated from the finding, with the rule's probabilities (e.g.
0.6 / 0.3 / 0.1). Its tokens are the Qwen2.5 tokenizer's ids of that text, then `<|im_end|>`.

Log-probabilities are exact, by prefix marginalisation over the candidates: after an answer prefix, the
probability of next token t is the total probability of the candidates that start with the prefix and continue
with t, divided by the total probability of those that start with the prefix. Where no candidate continues a
prefix (an answer the teacher would never write), it is certain of `<|im_end|>`; outside the answer (the prompt,
or after the answer's `<|im_end|>`) it is certain of the text's own token. Every row lists k entries as vLLM
does: the tokens with positive probability, then zero-probability tokens (the lowest ids not listed) at
FLOOR_LOGPROB, the -9999 vLLM reports for tokens a constraint forbids.

Served (on prep.testing.fault_server's asyncio HTTP server, so every scripted fault still works):

- chat completions: one candidate drawn with the request's `seed` (and the case; temperature 0 takes the most
  probable, temperature T samples p^(1/T)), with `logprobs`/`top_logprobs` (raw, pre-temperature, as vLLM
  reports them; tokens as `token_id:N` under `return_tokens_as_token_ids`, else their text, always their
  `bytes`), the `<|im_end|>` row last;
- `/v1/completions` on a token-id (or text) prompt with `prompt_logprobs: k`: vLLM's list (None first, then
  {"<id>": {"logprob", "rank", "decoded_token"}} holding the top k and the prompt's own token), `max_tokens`
  tokens continuing the prompt by the most probable path.

    python -m launch.fault_server --known-teacher [--port N]      # prints "port N"
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prep.answers import Answer, answer_json
from prep.paths import REPO_ROOT
from prep.qwen import IM_END_ID
from prep.tokenizer import token_bytes

TABLE_PATH = REPO_ROOT / "data" / "known_teacher" / "findings.json"
DEFAULT_MODEL = "known-teacher"
FLOOR_LOGPROB = -9999.0
_COMPLAINT = re.compile(r"主诉[:：]\s*([^\n]*)")


@dataclass(frozen=True)
class Rule:
    finding: str
    terms: tuple[str, ...]
    diseases: tuple[str, ...]
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class Candidate:
    text: str                 # the answer JSON
    disease: str
    probability: float
    token_ids: tuple[int, ...]    # the text's tokens, then <|im_end|>


class FindingsTable:
    """The rules of data/known_teacher/findings.json, in order."""

    def __init__(self, path: str | Path = TABLE_PATH):
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        self.reason_template: str = raw["reason_template"]
        defaults = {int(n): tuple(p) for n, p in raw["probabilities"].items()}
        self.rules = [self._rule(entry, defaults) for entry in raw["rules"]]
        self.fallback = self._rule(raw["fallback"], defaults)

    @staticmethod
    def _rule(entry: dict[str, Any], defaults: dict[int, tuple[float, ...]]) -> Rule:
        diseases = tuple(entry["diseases"])
        probabilities = tuple(entry.get("probabilities") or defaults[len(diseases)])
        if len(probabilities) != len(diseases) or abs(sum(probabilities) - 1) > 1e-9:
            raise ValueError(f"known-teacher rule {entry['finding']!r}: probabilities must be one per disease, "
                             f"summing to 1")
        if list(probabilities) != sorted(probabilities, reverse=True) or len(set(probabilities)) != len(probabilities):
            raise ValueError(f"known-teacher rule {entry['finding']!r}: probabilities must strictly decrease "
                             f"(the first disease is the most probable answer)")
        return Rule(entry["finding"], tuple(entry["terms"]), diseases, probabilities)

    @property
    def diseases(self) -> list[str]:
        """Every disease name the table can answer, in first-seen order."""
        return list(dict.fromkeys(d for rule in [*self.rules, self.fallback] for d in rule.diseases))

    def matched(self, case_text: str) -> Rule | None:
        """The first rule with a term in the chief-complaint line (the whole text when it has none); None: no rule."""
        found = _COMPLAINT.search(case_text)
        where = found.group(1) if found else case_text
        return next((rule for rule in self.rules if any(term in where for term in rule.terms)), None)

    def rule(self, case_text: str) -> Rule:
        return self.matched(case_text) or self.fallback

    def answers(self, case_text: str) -> list[tuple[Answer, float]]:
        """The candidate answers for a case and their probabilities, most probable first."""
        rule = self.rule(case_text)
        return [(Answer(self.reason_template.format(finding=rule.finding, disease=disease), disease), p)
                for disease, p in zip(rule.diseases, rule.probabilities)]

    def top_disease(self, case_text: str) -> str:
        return self.rule(case_text).diseases[0]


def next_token_distribution(candidates: list[Candidate], prefix: tuple[int, ...]) -> dict[int, float]:
    """Token id -> probability of coming next after PREFIX (answer tokens so far), by prefix marginalisation;
    {} when no candidate continues PREFIX."""
    mass: dict[int, float] = defaultdict(float)
    for candidate in candidates:
        ids = candidate.token_ids
        if len(ids) > len(prefix) and ids[:len(prefix)] == prefix:
            mass[ids[len(prefix)]] += candidate.probability
    total = sum(mass.values())
    return {token: p / total for token, p in mass.items()} if total else {}


class KnownTeacher:
    """The candidates of each case under a tokenizer, and the server's response bodies."""

    def __init__(self, tokenizer: Any, table: FindingsTable | None = None, model: str = DEFAULT_MODEL):
        self.tokenizer, self.table, self.model = tokenizer, table or FindingsTable(), model
        encode = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.assistant_header = encode("<|im_start|>assistant\n")
        self.user_header = encode("<|im_start|>user\n")
        self._encode = encode
        self._random = random.Random(0)
        self._bytes = token_bytes(tokenizer)
        self._candidates: dict[str, list[Candidate]] = {}

    def candidates(self, case_text: str) -> list[Candidate]:
        """The case's candidate answers with their tokens, most probable first."""
        if case_text not in self._candidates:
            self._candidates[case_text] = [
                Candidate(answer_json(answer), answer.diseases, p, self._encode(answer_json(answer)) + (IM_END_ID,))
                for answer, p in self.table.answers(case_text)]
        return self._candidates[case_text]

    def logprob_rows(self, candidates: list[Candidate], answer_ids: list[int]) -> list[dict[int, float]]:
        """For each answer token (and one row past the end): token id -> log-prob of the teacher's next token there."""
        rows = []
        for index in range(len(answer_ids) + 1):
            dist = next_token_distribution(candidates, tuple(answer_ids[:index])) or {IM_END_ID: 1.0}
            rows.append({token: math.log(p) for token, p in dist.items()})
        return rows

    # ---- chat completions -----------------------------------------------------------------------------------
    def choose(self, case_text: str, seed: int | None, temperature: float | None) -> Candidate:
        """The sampled candidate: the request's seed and the case fix the draw (no seed: the server's own stream)."""
        candidates = self.candidates(case_text)
        if temperature is not None and temperature <= 0:
            return candidates[0]
        weights = [c.probability ** (1.0 / (temperature or 1.0)) for c in candidates]
        draw = (random.Random(f"{seed}|{hashlib.sha256(case_text.encode()).hexdigest()}") if seed is not None
                else self._random)
        return draw.choices(candidates, weights)[0]

    def _entry(self, token: int, logprob: float, token_ids: bool) -> dict[str, Any]:
        raw = self._token_bytes(token)
        text = f"token_id:{token}" if token_ids else raw.decode("utf-8", errors="replace")
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def chat_body(self, request: dict[str, Any], received: int) -> dict[str, Any]:
        """A chat completion: one sampled candidate, with logprobs when asked."""
        case_text = next((m["content"] for m in request.get("messages", []) if m.get("role") == "user"), "")
        if not isinstance(case_text, str):
            raise ValueError("the user turn must be a string")
        chosen = self.choose(case_text, request.get("seed"), request.get("temperature"))
        logprobs = None
        if request.get("logprobs"):
            k = int(request.get("top_logprobs") or 0)
            token_ids = bool(request.get("return_tokens_as_token_ids"))
            rows = self.logprob_rows(self.candidates(case_text), list(chosen.token_ids))
            content = []
            for token, row in zip(chosen.token_ids, rows):
                top = self.top(row, k, must=token if k else None)
                content.append({**self._entry(token, row[token], token_ids),
                                "top_logprobs": [self._entry(t, lp, token_ids) for t, lp in top]})
            logprobs = {"content": content}
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in request.get("messages", []))
        completion = len(chosen.token_ids)
        return {"id": f"chatcmpl-known-{received}", "object": "chat.completion", "created": 0,
                "model": request.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": chosen.text},
                             "finish_reason": "stop", "logprobs": logprobs}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    @staticmethod
    def top(row: dict[int, float], k: int, must: int | None = None) -> list[tuple[int, float]]:
        """The k most likely of ROW (ties by id), MUST in place of the k-th when it is not among them (vLLM
        lists the sampled token), then zero-probability fillers at FLOOR_LOGPROB up to k."""
        ranked = sorted(row.items(), key=lambda item: (-item[1], item[0]))[:k]
        if must is not None and k and must not in {t for t, _ in ranked}:
            ranked = ranked[:k - 1] + [(must, row.get(must, FLOOR_LOGPROB))]
        used, filler = {t for t, _ in ranked}, 0
        while len(ranked) < k:
            if filler not in used:
                ranked.append((filler, FLOOR_LOGPROB))
            filler += 1
        return ranked

    # ---- /v1/completions --------------------------------------------------------------------------------------
    def prompt_rows(self, prompt_ids: list[int]) -> list[dict[int, float]]:
        """Token id -> log-prob of the teacher at each prompt position from the second on: the answer distribution
        inside the last assistant turn, certainty of the prompt's own token elsewhere."""
        start = _last_index(prompt_ids, self.assistant_header)
        rows = [{token: 0.0} for token in prompt_ids[1:]]
        if start is None:
            return rows
        case_text = self.tokenizer.decode(_user_turn(prompt_ids[:start], self.user_header))
        candidates = self.candidates(case_text)
        answer = prompt_ids[start:]
        end = answer.index(IM_END_ID) + 1 if IM_END_ID in answer else len(answer)
        for offset, row in enumerate(self.logprob_rows(candidates, answer[:end])[:end]):
            rows[start + offset - 1] = row
        return rows

    def completion_body(self, request: dict[str, Any], received: int) -> dict[str, Any]:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = list(self._encode(prompt))
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a non-empty string or list of token ids")
        k = request.get("prompt_logprobs")
        prompt_logprobs = None
        if k is not None:
            prompt_logprobs = [None]
            for token, row in zip(prompt[1:], self.prompt_rows(prompt)):
                listed = dict(self.top(row, int(k)))
                listed.setdefault(token, row.get(token, FLOOR_LOGPROB))
                ranks = {t: i + 1 for i, (t, _) in enumerate(sorted(row.items(), key=lambda it: (-it[1], it[0])))}
                prompt_logprobs.append({str(t): {"logprob": lp, "rank": ranks.get(t, len(row) + 1 + t),
                                                 "decoded_token": self.tokenizer.decode([t])}
                                        for t, lp in listed.items()})
        generated = self._continue(prompt, int(request.get("max_tokens") or 16))
        return {"id": f"cmpl-known-{received}", "object": "text_completion", "created": 0,
                "model": request.get("model"),
                "choices": [{"index": 0, "text": self.tokenizer.decode(generated), "logprobs": None,
                             "finish_reason": "stop" if generated and generated[-1] == IM_END_ID else "length",
                             "prompt_logprobs": prompt_logprobs}],
                "prompt_logprobs": prompt_logprobs,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(generated),
                          "total_tokens": len(prompt) + len(generated)}}

    def _continue(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Up to MAX_TOKENS tokens after PROMPT along the most probable path (nothing outside an answer)."""
        start = _last_index(prompt, self.assistant_header)
        if start is None:
            return []
        candidates = self.candidates(self.tokenizer.decode(_user_turn(prompt[:start], self.user_header)))
        answer, out = list(prompt[start:]), []
        while len(out) < max_tokens and IM_END_ID not in answer:
            dist = next_token_distribution(candidates, tuple(answer)) or {IM_END_ID: 1.0}
            token = max(dist.items(), key=lambda item: (item[1], -item[0]))[0]
            answer.append(token)
            out.append(token)
        return out

    def respond(self, path: str, request: dict[str, Any], received: int) -> dict[str, Any]:
        """The fault server's body hook: a chat or completions body; ValueError for a request it cannot answer."""
        if path.endswith("/chat/completions"):
            return self.chat_body(request, received)
        return self.completion_body(request, received)

    def answer_text(self, request: dict[str, Any]) -> str:
        """The fault server's answer_fn (what its faults wrap): the case's sampled answer."""
        return self.chat_body(request, 0)["choices"][0]["message"]["content"]


def _last_index(ids: list[int], needle: tuple[int, ...]) -> int | None:
    """The index just after the last occurrence of NEEDLE in IDS; None when absent."""
    for start in range(len(ids) - len(needle), -1, -1):
        if tuple(ids[start:start + len(needle)]) == needle:
            return start + len(needle)
    return None


def _user_turn(ids: list[int], header: tuple[int, ...]) -> list[int]:
    """The last user turn's content tokens in IDS (up to its <|im_end|>); [] without one."""
    start = _last_index(ids, header)
    if start is None:
        return []
    rest = ids[start:]
    return rest[:rest.index(IM_END_ID)] if IM_END_ID in rest else rest


def known_teacher_server(tokenizer: Any = None, table: FindingsTable | None = None, model: str = DEFAULT_MODEL,
                         **server_options: Any) -> Any:
    """A FaultServer (not started) that answers as a KnownTeacher; SERVER_OPTIONS go to FaultServer (latency,
    capacity, api_key, faults, ...). TOKENIZER: the rebuilt Qwen2.5 one by default."""
    from prep.testing.fault_server import FaultServer
    from prep.tokenizer import load_tokenizer

    teacher = KnownTeacher(tokenizer if tokenizer is not None else load_tokenizer(), table, model)
    server = FaultServer(model=model, answer_fn=teacher.answer_text, body_fn=teacher.respond, **server_options)
    server.teacher = teacher
    return server
