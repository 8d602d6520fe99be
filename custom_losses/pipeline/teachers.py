"""Whom the pipeline's stages ask, read from their recipes without asking anything, and what stage two can do with
that teacher: the plan's stage lines, the refusal of settings a teacher cannot serve (a hosted chat API or a
foreign tokenizer cannot score given answers), and the doctor's endpoint check with its one probe.

Plain functions over the pipeline recipe (custom_losses.pipeline.plan.PipelineRecipe, which imports this module to
refuse at validation time; typed by duck, so this module imports nothing of plan).
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from custom_losses.pipeline.cost import LOCAL_HOSTS
from custom_losses.pipeline.steps import PipelineError
from prep.api.preflight import check_endpoint
from prep.api.settings import ClientError, resolve_api_key
from prep.config import RecipeError, compose
from prep.paths import resolve_path
from prep.stages.api_stage import ApiRecipe, endpoint_target


@dataclass(frozen=True)
class Teacher:
    """Whom a teacher or soft-label recipe asks, read from its composed recipe without asking anything: kind is
    custom_losses.pipeline.cost.Served's (self-hosted: its step starts vLLM from the `server:` recipe; own-endpoint:
    a running server on this machine or behind a tunnel; hosted: any other URL)."""

    recipe: str                      # the stage recipe, as the pipeline recipe names it
    kind: str                        # self-hosted | own-endpoint | hosted
    model: str
    where: str                       # the serve recipe, or the endpoint URL(s)
    key_env: str | None = None       # the environment variable holding the key (hosted APIs)

    def words(self) -> str:
        if self.kind == "self-hosted":
            return f"self-hosted {self.model} (vLLM from {self.where}, started by its step; {self.recipe})"
        key = f"; key from ${self.key_env}" if self.key_env else ""
        owner = "hosted" if self.kind == "hosted" else "your endpoint"
        return f"{owner} {self.model} at {self.where} ({self.recipe}{key})"


@dataclass(frozen=True)
class SoftLabelTeacher:
    """The soft-label teacher and what it can do: whether it can score given answers (stage one's kept answers, the
    student's in on-policy rounds) decides which stage-two settings can run."""

    teacher: Teacher
    top_k: int
    tokenizer: str                   # same | foreign (softlabels.teacher_tokenizer)
    token_ids: bool                  # softlabels.return_tokens_as_token_ids: vLLM's exact ids, else by bytes

    @property
    def chat_api(self) -> bool:
        """A hosted chat API: another host, tokens by their bytes. It returns chat logprobs/top_logprobs of what it
        samples and has no prompt_logprobs. A URL elsewhere asking for vLLM's token ids is someone's vLLM: the
        doctor's probe decides for it, as for an endpoint on this machine."""
        return self.teacher.kind == "hosted" and not self.token_ids

    @property
    def scores_answers(self) -> bool | None:
        """True: it can score given answers (a vLLM server it starts); False: it cannot (a hosted chat API, or a
        foreign tokenizer, which cannot read an answer written in Qwen's tokens); None: the doctor's probe asks."""
        if self.tokenizer == "foreign" or self.chat_api:
            return False
        return True if self.teacher.kind == "self-hosted" else None

    def what(self) -> str:
        """What it is, in words, when it cannot score given answers (scores_answers is False)."""
        if self.chat_api:
            return "a hosted chat API (no prompt_logprobs)"
        return "a teacher with a foreign tokenizer (softlabels.teacher_tokenizer: foreign: it cannot read Qwen's tokens)"

    def tokenizer_words(self) -> str:
        if self.tokenizer == "foreign":
            return ("a foreign tokenizer (the teacher's own tokens aligned onto Qwen's by byte offsets: approximated "
                    "where the two cut the text differently)")
        return "the student's tokenizer (" + ("exact token ids)" if self.token_ids else
                                              "Qwen's tokens, mapped exactly by their bytes)")


def teacher_of(path: str, overrides: Sequence[str]) -> tuple[Teacher, dict[str, Any]]:
    """The Teacher a stage recipe PATH with OVERRIDES asks, and the composed recipe."""
    composed = compose(resolve_path(path).absolute(), [], list(overrides))
    client = composed.get("client") or {}
    server = composed.get("server")
    if server:
        spec = compose(resolve_path(server)) if isinstance(server, str) else dict(server)
        return Teacher(path, "self-hosted", str(spec.get("model")), str(server)), composed
    urls = [str(client.get("base_url") or "")] if not client.get("endpoints") else \
        [str(item.get("base_url") or "") for item in client["endpoints"]]
    local = all((urlparse(url).hostname or "") in LOCAL_HOSTS for url in urls)
    keys = [client.get("api_key_env")] + [item.get("api_key_env") for item in client.get("endpoints") or []]
    return Teacher(path, "own-endpoint" if local else "hosted", str(client.get("model")), ", ".join(urls),
                   next((key for key in keys if key), None)), composed


def softlabel_teacher(recipe: Any) -> SoftLabelTeacher:
    s2 = recipe.stage2
    teacher, composed = teacher_of(s2.softlabels, s2.softlabels_set)
    settings = composed.get("softlabels") or {}
    return SoftLabelTeacher(teacher, int(settings.get("top_k") or 20), str(settings.get("teacher_tokenizer") or "same"),
                            bool(settings.get("return_tokens_as_token_ids", True)))


def refuse_unscorable(path: str | Path, recipe: Any) -> None:
    """A soft-label teacher that cannot score given answers with settings that need it: RecipeError in one sentence
    naming the key and the fix, before anything is asked (an endpoint that may be a vLLM server is asked by the
    doctor's probe instead: check_teacher)."""
    s2 = recipe.stage2
    labeller = softlabel_teacher(recipe)
    if labeller.scores_answers is not False or not s2.scores_fixed_answers:
        return
    key, value = (("stage2.softlabel_answers", "kept") if s2.softlabel_answers == "kept"
                  else ("stage2.on_policy_rounds", s2.on_policy_rounds))
    fixes = ["--set stage2.softlabel_answers=fresh"] if s2.softlabel_answers == "kept" else []
    fixes += ["--set stage2.on_policy_rounds=0"] if s2.on_policy_rounds else []
    raise RecipeError(path, key, f"is {value}, which needs the soft-label teacher to score given answers, but "
                      f"{s2.softlabels} ({labeller.teacher.where}) is {labeller.what()}, which cannot; run with "
                      f"{' '.join(fixes)}, or name a vLLM soft-label teacher in stage2.softlabels "
                      f"(docs/HOSTED_TEACHER.md)")


def stage_lines(recipe: Any) -> list[str]:
    """Whom each stage asks and what stage two can do with it, in words, for the plan: the teachers (hosted,
    your endpoint, self-hosted), where stage two's answers come from, the tokenizer path and the on-policy rounds."""
    teacher, _ = teacher_of(recipe.stage1.teacher, recipe.stage1.teacher_set)
    lines = [f"stage one: teacher answers from {teacher.words()}"]
    if 2 not in recipe.stages:
        return [*lines, f"stage two: not in this run (stages {recipe.stages}; --stages 1,2 runs it)"]
    s2, labeller = recipe.stage2, softlabel_teacher(recipe)
    if s2.softlabel_answers == "kept":
        answers = "scoring the answers stage one kept (stage2.softlabel_answers: kept, prompt_logprobs)"
    elif labeller.scores_answers is False:
        answers = f"of fresh samples (stage2.softlabel_answers: fresh: {labeller.what()} can't score given answers)"
    else:
        answers = "of fresh samples (stage2.softlabel_answers: fresh)"
    lines.append(f"stage two: soft labels from {labeller.teacher.words()}: top-{labeller.top_k} log-probs {answers}; "
                 f"{labeller.tokenizer_words()}")
    rounds = f"stage2.on_policy_rounds: {s2.on_policy_rounds}"
    if labeller.scores_answers is False:
        can = (f"none possible with {labeller.what()} (a round needs the teacher to score the student's answers; "
               f"a vLLM teacher can)")
    elif labeller.scores_answers:
        can = "possible (this vLLM teacher scores the student's answers)"
    else:
        can = "possible if the endpoint is a vLLM server (the doctor asks it for prompt_logprobs when they are needed)"
    return [*lines, f"stage two: on-policy rounds: {can}; {rounds}"]


def check_teacher(role: str, teacher: ApiRecipe, scores_answers: bool = False, generates: bool = False) -> str:
    """A hosted teacher must answer now (key set, key accepted, model listed); a self-hosted one starts later.
    SCORES_ANSWERS: a soft-label teacher that must score given answers (stage two on stage one's kept answers,
    on-policy rounds) must return prompt_logprobs, which vLLM does and hosted chat APIs do not: one probe.
    GENERATES: a soft-label teacher that samples fresh answers must return top_k chat log-probs: one max_tokens=1
    chat request, so that an API that returns fewer alternatives, or none, fails here and not after the run paid."""
    if teacher.server is not None:
        return f"{role} is self-hosted: its step starts the vLLM server"
    settings = endpoint_target(teacher.client, teacher.server).settings
    check_endpoint(settings)  # one sentence on a missing key, 401, wrong model or unreachable endpoint (each one)
    if generates and not scores_answers:
        from prep.stages.softlabels import probe_top_k  # the stage's own probe (imported late: it loads transformers)

        top_k = teacher.softlabels.top_k
        try:
            asyncio.run(probe_top_k(settings, resolve_api_key(settings.resolved()[0]), top_k, "generate"))
        except ClientError as err:   # "what is wrong; its fix": the fix said for a teacher that samples
            raise ClientError(f"{role}: {str(err).partition('; ')[0]}; lower softlabels.top_k to what the API returns "
                              f"(stage2.softlabels_set), or name a teacher whose API returns chat logprobs/"
                              f"top_logprobs in stage2.softlabels (docs/HOSTED_TEACHER.md)") from None
        return (f"{role} endpoint(s) {', '.join(endpoint.base_url for endpoint in settings.resolved())} answer, "
                f"with {top_k} log-probs per position")
    if scores_answers:
        from prep.stages.softlabels import probe_top_k  # the stage's own probe (imported late: it loads transformers)

        endpoint = settings.resolved()[0]
        try:
            asyncio.run(probe_top_k(settings, resolve_api_key(endpoint), teacher.softlabels.top_k, "score"))
        except ClientError as err:
            raise PipelineError(f"{role}: {err}. Scoring stage one's kept answers (stage2.softlabel_answers: kept) "
                                "and on-policy rounds need a vLLM teacher (a `server:` section or a vLLM "
                                "endpoint); with a hosted chat API set stage2.softlabel_answers: fresh and "
                                "stage2.on_policy_rounds: 0") from None
    return f"{role} endpoint(s) {', '.join(endpoint.base_url for endpoint in settings.resolved())} answer"
