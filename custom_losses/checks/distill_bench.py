"""Stage two's batches on the real cases, packed versus unpacked: what a GPU forward pass sees.

The command is `python -m launch.bench_distill`. Part one needs no model: the real step-one cases are
rendered exactly as the distill data is (the soft-label recipe's system prompt and user template,
Qwen2.5's chat template, `prep.tokenizer`), an answer length is attached to each case, and each distill
recipe's batches are laid out two ways:

  unpacked  the collator without kd_packing: per_device_train_batch_size cases per micro-batch,
            right-padded to the longest one;
  packed    kd_packing: custom_losses.kd.packing.pack_by_length bins the cases into rows of up to max_length
            tokens, per_device_train_batch_size rows per micro-batch (padded to the longest row, or
            concatenated into one row with kd_padding_free).

Both in a shuffled order (the recipe's seed), as the Trainer's sampler would. Reported per layout: real
(non-pad) tokens and cases per micro-batch, the padded fraction of the forward tokens (0 for a one-row
micro-batch: nothing to pad it to), the fill (real tokens over rows x max_length, what the rows could
hold) and optimiser steps per epoch on the GPUs the recipe's header names.

Answer lengths. The soft-label recipe caps the teacher's answer at `sampling.max_tokens`
(recipes/softlabels/vllm-qwen2.5-72b-instruct.yaml). That is a cap against run-away generation, not a
length: the competition's published example answers (example_output_early.jsonl beside the cases),
in our answer format (prep.answers.answer_json) plus <|im_end|>, are far shorter. So the headline
uses those lengths (case i gets example i mod 3), capped at max_tokens; `answers="budget"` gives every
answer the full max_tokens instead: the worst case, which the command prints too.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_losses.kd.packing import pack_by_length
from prep.answers import answer_json, parse_answer
from prep.config import compose
from prep.jsonio import read_jsonl
from prep.paths import REPO_ROOT, resolve_path
from prep.prompts import load_prompts
from prep.records import read_cases

SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "healthai2025"
CASES_PATH = SHARED_DATA / "camp_data_step_1_without_answer.jsonl"
EXAMPLES_PATH = SHARED_DATA / "example_output_early.jsonl"
SOFTLABEL_RECIPE = "recipes/softlabels/vllm-qwen2.5-72b-instruct.yaml"
BATCH_KEYS = ("per_device_train_batch_size", "max_length", "gradient_accumulation_steps", "seed", "kd_padding_free")


def batch_defaults() -> dict[str, Any]:
    """What the trainer's config (KDConfig, over TRL's SFTConfig) gives the batching keys a recipe leaves out."""
    from dataclasses import fields

    from custom_losses.kd.trainer import KDConfig

    return {spec.name: spec.default for spec in fields(KDConfig) if spec.name in BATCH_KEYS}


@dataclass(frozen=True)
class Layout:
    """One way of batching an epoch: micro-batches of rows, each row a list of case indices."""

    name: str
    micro_batches: list[list[list[int]]]
    real_tokens: int
    forward_tokens: int          # real + padding: micro-batch rows x the longest row, summed

    @property
    def pad_fraction(self) -> float:
        return 1 - self.real_tokens / self.forward_tokens if self.forward_tokens else 0.0

    @property
    def tokens_per_micro_batch(self) -> float:
        return self.real_tokens / max(len(self.micro_batches), 1)

    def fill(self, max_length: int) -> float:
        """Real tokens over the rows' capacity (rows x max_length): how much of what a row may hold it holds."""
        rows = sum(len(batch) for batch in self.micro_batches)
        return self.real_tokens / (rows * max_length) if rows else 0.0

    def steps_per_epoch(self, accumulation: int, gpus: int) -> int:
        return math.ceil(len(self.micro_batches) / (accumulation * gpus))


@dataclass(frozen=True)
class RecipeBatching:
    """What a distill recipe decides about its batches."""

    name: str
    micro_batch: int
    max_length: int
    accumulation: int
    seed: int
    gpus: int
    padding_free: bool = False   # kd_padding_free: a packed micro-batch is its rows concatenated, never padded


def recipe_batching(path: str | Path, gpus: int, overlays: Sequence[str | Path] = (),
                    overrides: Sequence[str] = ()) -> RecipeBatching:
    """The batching keys of a distill recipe (the trainer config's defaults where it leaves one out)."""
    composed = compose(path, list(overlays), list(overrides))
    config = {**batch_defaults(), **{key: value for key, value in composed.items() if value is not None}}
    return RecipeBatching(Path(path).name, int(config["per_device_train_batch_size"]), int(config["max_length"]),
                          int(config["gradient_accumulation_steps"]), int(config["seed"]), gpus,
                          bool(config["kd_padding_free"]))


def softlabel_budget(recipe: str | Path = SOFTLABEL_RECIPE) -> tuple[Any, int]:
    """The soft-label recipe's prompt set (what the distill data is rendered with) and answer cap."""
    config = compose(recipe)
    prompts = config.get("prompts") or {}
    return load_prompts(prompts.get("system"), prompts.get("user")), int(config["sampling"]["max_tokens"])


def prompt_lengths(cases_path: str | Path, prompts: Any, tokenizer: Any, limit: int | None = None) -> list[int]:
    """Tokens of each case's system + user turns and the assistant header, as build_kd_features renders them."""
    from prep.tokenizer import chat_token_ids

    cases = read_cases(resolve_path(cases_path)).cases[:limit]
    return [len(chat_token_ids(tokenizer, prompts.messages(case), add_generation_prompt=True)) for case in cases]


def example_answer_lengths(tokenizer: Any, path: str | Path = EXAMPLES_PATH) -> list[int]:
    """Tokens of each published example answer in the training format, <|im_end|> included."""
    lengths = []
    for row in read_jsonl(path):
        answer = parse_answer(row["bingli_json"])
        lengths.append(len(tokenizer(answer_json(answer), add_special_tokens=False)["input_ids"]) + 1)
    return lengths


def answer_lengths(count: int, budget: int, examples: Sequence[int], answers: str = "examples") -> list[int]:
    """One answer length per case: the examples in turn, capped at BUDGET, or BUDGET itself ("budget")."""
    if answers == "budget":
        return [budget] * count
    if not examples:
        raise ValueError("no example answers to take lengths from")
    return [min(examples[i % len(examples)], budget) for i in range(count)]


def _micro_batches(rows: list[list[int]], size: int, seed: int) -> list[list[list[int]]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[start:start + size]] for start in range(0, len(order), size)]


def _layout(name: str, micro_batches: list[list[list[int]]], lengths: Sequence[int],
            padding_free: bool = False) -> Layout:
    real = forward = 0
    for batch in micro_batches:
        rows = [sum(lengths[i] for i in row) for row in batch]
        real += sum(rows)
        forward += sum(rows) if padding_free else len(rows) * max(rows)
    return Layout(name, micro_batches, real, forward)


def unpacked(lengths: Sequence[int], micro_batch: int, seed: int) -> Layout:
    """Today's batches: one case per row, MICRO_BATCH rows right-padded to the longest."""
    return _layout("unpacked", _micro_batches([[i] for i in range(len(lengths))], micro_batch, seed), lengths)


def packed(lengths: Sequence[int], micro_batch: int, max_length: int, seed: int, padding_free: bool = False) -> Layout:
    """pack_by_length's rows of up to MAX_LENGTH tokens, MICRO_BATCH rows per micro-batch (padded to the longest
    row, or concatenated into one: PADDING_FREE)."""
    return _layout("packed", _micro_batches(pack_by_length(lengths, max_length), micro_batch, seed), lengths,
                   padding_free)


def over_long(lengths: Sequence[int], max_length: int) -> list[int]:
    """Indices of the cases longer than MAX_LENGTH (a packed run refuses them; they are reported, never dropped)."""
    return [i for i, length in enumerate(lengths) if length > max_length]


def compare(lengths: Sequence[int], recipe: RecipeBatching) -> tuple[Layout, Layout]:
    """(unpacked, packed) layouts of one epoch of LENGTHS under RECIPE's batching."""
    too_long = over_long(lengths, recipe.max_length)
    if too_long:
        raise ValueError(f"{recipe.name}: {len(too_long)} case(s) longer than max_length {recipe.max_length}, "
                         f"e.g. case {too_long[0]} with {lengths[too_long[0]]} tokens")
    return (unpacked(lengths, recipe.micro_batch, recipe.seed),
            packed(lengths, recipe.micro_batch, recipe.max_length, recipe.seed, recipe.padding_free))


# ---- part two: the tiny model on CPU, packed versus unpacked ------------------------------------

def synthetic_softlabel_rows(cases: Sequence[Any], prompts: Any, answers: Sequence[Any], tokenizer: Any, top_k: int,
                             seed: int = 0) -> list[dict[str, Any]]:
    """Rows in prep.stages.softlabels' layout for CASES: answer i mod len(ANSWERS) as the teacher's answer, and a
    synthetic top-k (the answer token first, random others, a peaked log-softmax): the lengths and shapes
    of real soft labels, whose values a throughput measurement does not depend on."""
    import torch

    from custom_losses.kd.token_weights import TokenWeightConfig, answer_token_weights

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, case in enumerate(cases):
        answer = answers[index % len(answers)]
        messages = prompts.messages(case, answer)
        ids = answer_token_weights(tokenizer, answer_json(answer), messages[1]["content"], TokenWeightConfig(lexicon_path=None)).ids
        others = torch.randint(0, 150000, (len(ids), top_k - 1), generator=generator)
        logits = torch.randn(len(ids), top_k, generator=generator)
        logits[:, 0] += 3.0
        rows.append({"id": case.id, "messages": messages, "answer_token_ids": ids,
                     "target_token_ids": torch.cat([torch.tensor(ids)[:, None], others], dim=1).tolist(),
                     "logprobs": torch.log_softmax(logits, dim=-1).tolist(), "temperature": 1.0})
    return rows


def _timed_pass(trainer: Any, batches: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(wall, CPU) seconds of forward + backward of the KD loss over BATCHES (no optimiser step: it is the same
    either way). CPU seconds count the work alone: on a machine shared with other jobs the wall time does not."""
    import time

    import torch

    model = trainer.model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        weight_sum = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        trainer.compute_loss(model, batch, num_items_in_batch=weight_sum).backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_throughput(cases: Sequence[Any], prompts: Any, answers: Sequence[Any], recipe: str | Path,
                   overlays: Sequence[str | Path], top_k: int, workdir: str | Path, rounds: int = 2) -> dict[str, Any]:
    """Answer tokens per second of forward + backward on the recipe's student under OVERLAYS (the tiny CPU
    model), unpacked (KDDataCollator rows of one case) versus packed (custom_losses.kd.packing rows), same cases,
    same run, ROUNDS alternating passes each (the best of each counts: the machine is shared)."""
    import torch
    from datasets import Dataset

    from custom_losses.kd.packing import pack_features
    from custom_losses.kd.trainer import KDDataCollator, WeightedKDTrainer, build_kd_features
    from custom_losses.train.distill import load_student, parse_recipe

    script_args, args, model_args = parse_recipe(recipe, list(overlays), [f"output_dir={workdir}", "report_to=none"])
    model, tokenizer, peft_config = load_student(model_args, script_args, model_args.model_name_or_path)
    rows = synthetic_softlabel_rows(cases, prompts, answers, tokenizer, top_k)
    features = [build_kd_features(row, tokenizer, args.weight_config()) for row in rows]
    lengths = [len(feature["input_ids"]) for feature in features]
    fits = [i for i, length in enumerate(lengths) if length <= args.max_length]
    features, lengths = [features[i] for i in fits], [lengths[i] for i in fits]
    # Today's collator right-pads one case a row; the packed one follows the recipe (kd_padding_free or not).
    collate = {"unpacked": KDDataCollator(tokenizer.pad_token_id, top_k),
               "packed": KDDataCollator(tokenizer.pad_token_id, top_k, padding_free=args.kd_padding_free)}
    trainer = WeightedKDTrainer(model=model, args=args, train_dataset=Dataset.from_list(features[:1]),
                                data_collator=collate["packed"], processing_class=tokenizer, peft_config=peft_config)
    bs = args.per_device_train_batch_size
    layouts = {"unpacked": unpacked(lengths, bs, args.seed),
               "packed": packed(lengths, bs, args.max_length, args.seed, args.kd_padding_free)}
    batches = {name: [collate[name]([pack_features([features[i] for i in row]) for row in micro_batch])
                      for micro_batch in layout.micro_batches]
               for name, layout in layouts.items()}
    answer_tokens = sum(sum(label != -100 for label in feature["labels"]) for feature in features)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: its CPU time is the work, with no spinning of idle workers in it
    try:
        _timed_pass(trainer, batches["unpacked"][:1])  # warm-up: first-call costs outside the timings
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in batches}
        for _ in range(rounds):  # alternating, so a busy spell on the shared machine hits both
            for name in batches:
                times[name].append(_timed_pass(trainer, batches[name]))
    finally:
        torch.set_num_threads(threads)
    wall = {name: min(w for w, _ in values) for name, values in times.items()}
    cpu = {name: min(c for _, c in values) for name, values in times.items()}
    return {"cases": len(features), "left_out": len(cases) - len(features), "max_length": args.max_length,
            "micro_batch": bs, "answer_tokens": answer_tokens, "wall_s": wall, "cpu_s": cpu,
            "micro_batches": {name: len(layout.micro_batches) for name, layout in layouts.items()},
            "tokens_per_s": {name: answer_tokens / max(value, 1e-9) for name, value in cpu.items()}}


# ---- the report ---------------------------------------------------------------------------------

def header_gpus(path: str | Path) -> int:
    """The GPUs a distill recipe is written for: the first '#   N GPU(s): X GiB' prediction of its header."""
    import re

    for line in resolve_path(path).read_text(encoding="utf-8-sig").splitlines():
        match = re.match(r"#\s+(\d+) GPUs?: [0-9.]+ GiB", line)
        if match:
            return int(match.group(1))
    return 1


def _percentile(values: Sequence[int], point: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(point * len(ordered)))]


def batching_report(lengths: Sequence[int], recipes: Sequence[RecipeBatching], out) -> tuple[float, float]:
    """Print each recipe's unpacked and packed layout; (worst packed padding, 1 - fill, and worst tokens-per-forward
    ratio) over RECIPES."""
    out(f"{'recipe':<44} {'GPUs':>4} {'layout':<9}{'tokens/micro-batch':>19}{'cases':>7}{'pad':>8}{'fill':>7}"
        f"{'steps/epoch':>12}")
    pads, ratios = [], []
    for recipe in recipes:
        too_long = set(over_long(lengths, recipe.max_length))
        kept = [length for i, length in enumerate(lengths) if i not in too_long]
        if too_long:
            out(f"{recipe.name}: {len(too_long)} case(s) longer than max_length {recipe.max_length} left out here "
                f"(a run refuses them)")
        before, after = compare(kept, recipe)
        for layout in (before, after):
            cases = sum(len(row) for batch in layout.micro_batches for row in batch) / len(layout.micro_batches)
            out(f"{recipe.name:<44} {recipe.gpus:>4} {layout.name:<9}{layout.tokens_per_micro_batch:>19.0f}{cases:>7.2f}"
                f"{layout.pad_fraction:>8.4f}{layout.fill(recipe.max_length):>7.3f}"
                f"{layout.steps_per_epoch(recipe.accumulation, recipe.gpus):>12}")
        # Unused row capacity counts as padding here (a collator padding every row to max_length would add
        # exactly that): the strict reading of "padded fraction", never below the dynamic collator's pad.
        pads.append(1 - after.fill(recipe.max_length))
        ratios.append(after.tokens_per_micro_batch / before.tokens_per_micro_batch)
    return max(pads), min(ratios)


def run(cases_path: str | Path, recipes: Sequence[str | Path], softlabel_recipe: str | Path = SOFTLABEL_RECIPE,
        examples_path: str | Path = EXAMPLES_PATH, limit: int | None = None, cpu_cases: int = 48,
        cpu_recipe: str | Path | None = None, cpu_overlays: Sequence[str | Path] = (), out=print) -> int:
    """The whole benchmark, printed through OUT; the last line is
    `pad_fraction_packed=A tokens_per_forward_ratio=B cpu_speedup=C`: A = 1 - fill of the packed rows (their unused
    max_length capacity), B = real tokens per packed micro-batch over unpacked, each for the worst recipe; C = packed
    over unpacked answer tokens per CPU second on the tiny model. Returns the exit code."""
    import statistics
    import tempfile

    from prep.tokenizer import load_tokenizer

    missing = [path for path in (cases_path, examples_path) if not resolve_path(path).exists()]
    if missing:
        out(f"bench_distill: {missing[0]} is not here (the competition data lives in ../shared); nothing measured")
        return 0
    tokenizer = load_tokenizer()
    prompts, budget = softlabel_budget(softlabel_recipe)
    prompt_tokens = prompt_lengths(cases_path, prompts, tokenizer, limit)
    examples = example_answer_lengths(tokenizer, examples_path)
    out(f"{len(prompt_tokens)} cases from {cases_path}, rendered with {softlabel_recipe}'s prompts and Qwen2.5's chat "
        f"template: prompt tokens median {statistics.median(prompt_tokens):.0f}, mean {statistics.mean(prompt_tokens):.0f}, "
        f"p99 {_percentile(prompt_tokens, 0.99)}, max {max(prompt_tokens)}")
    settings = [recipe_batching(path, header_gpus(path)) for path in recipes]
    worst = {}
    for answers in ("budget", "examples"):
        lengths = [p + a for p, a in zip(prompt_tokens, answer_lengths(len(prompt_tokens), budget, examples, answers))]
        what = (f"every answer at the soft-label budget, max_tokens {budget} (the worst case)" if answers == "budget" else
                f"answers as long as the published examples ({', '.join(map(str, examples))} tokens, in turn; "
                f"cap {budget})")
        out(f"\n{what}: cases median {statistics.median(lengths):.0f} tokens, mean {statistics.mean(lengths):.0f}")
        worst[answers] = batching_report(lengths, settings, out)
    pad, ratio = worst["examples"]
    out(f"worst case (every answer {budget} tokens): pad_fraction_packed={worst['budget'][0]:.4f} "
        f"tokens_per_forward_ratio={worst['budget'][1]:.2f}")

    speedup = float("nan")
    if cpu_cases > 0 and cpu_recipe:
        cases = read_cases(resolve_path(cases_path)).cases[:cpu_cases]
        answers_text = [parse_answer(row["bingli_json"]) for row in read_jsonl(examples_path)]
        top_k = int(compose(softlabel_recipe)["softlabels"]["top_k"])
        with tempfile.TemporaryDirectory() as workdir:
            cpu = cpu_throughput(cases, prompts, answers_text, cpu_recipe, cpu_overlays, top_k, workdir)
        speedup = cpu["tokens_per_s"]["packed"] / cpu["tokens_per_s"]["unpacked"]
        out(f"\ncpu: tiny model, {Path(cpu_recipe).name} + {', '.join(Path(o).name for o in cpu_overlays)} "
            f"(max_length {cpu['max_length']}, micro-batch {cpu['micro_batch']}), {cpu['cases']} cases "
            f"({cpu['left_out']} longer than max_length left out), {cpu['answer_tokens']} answer tokens, top-{top_k}")
        for name in ("unpacked", "packed"):
            out(f"  {name:<9}{cpu['micro_batches'][name]:>4} micro-batches  {cpu['cpu_s'][name]:7.2f} CPU s "
                f"({cpu['wall_s'][name]:.2f} s wall)  {cpu['tokens_per_s'][name]:8.0f} answer tokens/s "
                f"(forward + backward, one thread)")
    out(f"pad_fraction_packed={pad:.4f} tokens_per_forward_ratio={ratio:.2f} cpu_speedup={speedup:.2f}")
    return 0
