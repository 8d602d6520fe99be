"""The doctor's checks of the machine: GPUs, driver and torch build, memory, precision, attention kernels,
bitsandbytes, the vLLM environment, NCCL, disk and the models a pipeline needs.

Each check is a small function of what it inspects (the GPUs, a module name, a path and a size, a model id), so
the tests fake a condition by passing it (no GPU, a missing module, too little disk) rather than by patching this
code. What a pipeline step asks of the machine arrives as a StepNeeds (custom_losses.checks.doctor builds them
from the recipe); each check returns one CheckResult, whose line is `ok   <check>: <detail>`,
`FAIL <check>: <what is wrong>; fix: <exact fix>` or `skip <check>: <why>`.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from custom_losses.train.memory import GIB
from prep.api.preconditions import cached_snapshot, model_problem
from prep.paths import REPO_ROOT, free_gib, resolve_path

# The module each attention implementation imports; sdpa and eager need only torch.
ATTENTION_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
SDPA_OVERLAY = "recipes/sft/overrides/sdpa.yaml"
AMPERE = (8, 0)   # bf16 and tf32 arrive with compute capability 8.0


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: str           # ok | FAIL | skip
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        text = f"{self.status:<4} {self.check}: {self.detail}"
        return f"{text}; fix: {self.fix}" if self.failed else text


def ok(check: str, detail: str) -> CheckResult:
    return CheckResult(check, "ok", detail)


def fail(check: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(check, "FAIL", detail, fix)


def skip(check: str, detail: str) -> CheckResult:
    return CheckResult(check, "skip", detail)


# --------------------------------------------------------------------------- the machine

@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int]


@dataclass(frozen=True)
class Machine:
    gpus: tuple[Gpu, ...] = ()
    driver: str | None = None          # NVIDIA driver version (nvidia-smi), None without one
    torch_version: str = ""
    torch_cuda: str | None = None      # the CUDA version torch was built for; None for a CPU build

    @classmethod
    def here(cls) -> Machine:
        import torch

        driver = None
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30)
                driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
            except (OSError, subprocess.TimeoutExpired):
                driver = None
        gpus = []
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                gpus.append(Gpu(props.name, props.total_memory / GIB, (props.major, props.minor)))
        return cls(tuple(gpus), driver, torch.__version__, torch.version.cuda)


# --------------------------------------------------------------------------- what the recipe asks of it

@dataclass
class StepNeeds:
    """One training or serving step of the pipeline, as the machine must serve it."""

    name: str                           # sft, distill, teacher, predict-stage1, ...
    kind: str                           # train | serve
    recipe: str
    gpu_reasons: list[str] = field(default_factory=list)   # empty: it runs on the CPU
    gpus: int = 1                       # GPUs it must see at once (a server's tensor-parallel size)
    estimate_gib: float | None = None   # predicted peak per GPU
    estimate_note: str = ""             # why there is no estimate
    budget_fraction: float = 1.0        # share of each GPU it may use (vLLM's --gpu-memory-utilization)
    bf16: bool = False
    tf32: bool = False
    attention: str = ""
    four_bit: bool = False

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpu_reasons)


# --------------------------------------------------------------------------- the checks

def check_cuda(steps: Sequence[StepNeeds], machine: Machine) -> CheckResult:
    gpu_steps = [step for step in steps if step.on_gpu]
    if not gpu_steps:
        return ok("cuda", "not needed: every step runs on the CPU")
    needed = max(step.gpus for step in gpu_steps)
    wants = "; ".join(f"{step.name} ({', '.join(step.gpu_reasons)})" for step in gpu_steps)
    if not machine.gpus:
        if machine.driver and not machine.torch_cuda:
            return fail("cuda", f"torch {machine.torch_version} is a CPU build, though driver {machine.driver} "
                        f"is here; needed by {wants}",
                        "rm -rf .venv && bash launch/setup.sh on this GPU machine (it installs a CUDA build of torch)")
        if machine.driver:
            return fail("cuda", f"driver {machine.driver} is here but torch {machine.torch_version} (CUDA "
                        f"{machine.torch_cuda}) sees no GPU; needed by {wants}",
                        f"install a driver that supports CUDA {machine.torch_cuda} (nvidia-smi shows the CUDA "
                        f"version it supports), and check CUDA_VISIBLE_DEVICES")
        return fail("cuda", f"no CUDA GPU visible (no NVIDIA driver, torch {machine.torch_version}); needed by {wants}",
                    "run this recipe on a machine with NVIDIA GPUs (nvidia-smi lists them), or run "
                    "recipes/pipeline/tiny-cpu.yaml on a CPU")
    if len(machine.gpus) < needed:
        step = max(gpu_steps, key=lambda s: s.gpus)
        return fail("cuda", f"{len(machine.gpus)} GPU(s) visible, {step.name} needs {needed} "
                    f"(tensor parallel in {step.recipe})", f"rent {needed} GPUs, or point {step.name} at a "
                    f"server running elsewhere (--set with server=null and client.base_url)")
    names = ", ".join(sorted({gpu.name for gpu in machine.gpus}))
    return ok("cuda", f"{len(machine.gpus)} x {names}, driver {machine.driver}, torch {machine.torch_version} "
              f"(CUDA {machine.torch_cuda})")


def check_gpu_memory(steps: Sequence[StepNeeds], gpus: Sequence[Gpu]) -> CheckResult:
    gpu_steps = [step for step in steps if step.on_gpu]
    if not gpu_steps:
        return ok("gpu memory", "not needed: every step runs on the CPU")
    if not gpus:
        return skip("gpu memory", "no GPU to hold the estimates against")
    smallest = min(gpus, key=lambda gpu: gpu.memory_gib)
    fits, problems = [], []
    for step in gpu_steps:
        if step.estimate_gib is None:
            fits.append(f"{step.name} not estimated ({step.estimate_note})")
            continue
        budget = smallest.memory_gib * step.budget_fraction
        text = f"{step.name} {step.estimate_gib:.1f} GiB"
        (problems if step.estimate_gib > budget else fits).append(text if step.estimate_gib <= budget else
                                                                  f"{text} > {budget:.1f} GiB ({step.recipe})")
    where = f"{smallest.memory_gib:.1f} GiB per GPU ({smallest.name})"
    if problems:
        return fail("gpu memory", f"{'; '.join(problems)} on {where}",
                    "a GPU with more memory, more GPUs, or the recipe's smaller settings (the QLoRA recipe, "
                    "micro_batch_size/sequence_len; a server's --max-model-len or --gpu-memory-utilization); "
                    "`python -m launch.estimate_memory --config RECIPE` shows each term")
    return ok("gpu memory", f"{', '.join(fits)} fit {where}")


def check_precision(steps: Sequence[StepNeeds], gpus: Sequence[Gpu]) -> CheckResult:
    wants = [f"{step.name} ({'bf16' if step.bf16 else ''}{'+' if step.bf16 and step.tf32 else ''}"
             f"{'tf32' if step.tf32 else ''})" for step in steps if step.on_gpu and (step.bf16 or step.tf32)]
    if not wants:
        return ok("bf16/tf32", "no step asks for bf16 or tf32")
    if not gpus:
        return skip("bf16/tf32", "no GPU to check")
    old = [gpu for gpu in gpus if gpu.capability < AMPERE]
    if old:
        gpu = old[0]
        return fail("bf16/tf32", f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) has "
                    f"neither; asked by {', '.join(wants)}",
                    "rent an Ampere or newer GPU (compute capability >= 8.0: A10, L4, A100, H100, RTX 3090/4090)")
    return ok("bf16/tf32", f"supported on every GPU; asked by {', '.join(wants)}")


def module_problem(module: str) -> str | None:
    """None when MODULE imports; else the import error in one line."""
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or an ABI mismatch raising OSError/RuntimeError at import
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def check_attention(attention: dict[str, str], modules: dict[str, str] = ATTENTION_MODULES,
                    machine: Machine | None = None) -> CheckResult:
    """ATTENTION: step -> attn_implementation its recipe names. MODULES: implementation -> module it imports.
    MACHINE (this one by default) says whether flash-attn can be built here: only against a CUDA build of torch."""
    import torch

    torch_version, torch_cuda = (torch.__version__, torch.version.cuda) if machine is None else \
        (machine.torch_version, machine.torch_cuda)

    named = {step: impl for step, impl in attention.items() if impl}
    if not named:
        return ok("attention", "no recipe names an attention implementation (transformers' default)")
    problems = []
    for step, impl in named.items():
        module = modules.get(impl)
        if module is None:
            if impl in ("sdpa", "eager") and hasattr(torch.nn.functional, "scaled_dot_product_attention"):
                continue
            if impl not in ("sdpa", "eager"):
                problems.append(f"{step} names {impl}, which this check does not know")
            continue
        problem = module_problem(module)
        if problem:
            problems.append(f"{step} names {impl} but `import {module}` fails ({problem})")
    if problems:
        without = (f"run without it: --set 'stage1.sft_overlays=[{SDPA_OVERLAY}]' (SFT, packing via sdpa varlen) and "
                   f"--set 'stage2.distill_set=[attn_implementation=sdpa]'")
        if not torch_cuda:   # flash-attn compiles CUDA kernels: nothing to build against a CPU torch
            return fail("attention", "; ".join(problems) + f"; torch {torch_version} here is a CPU build",
                        f"flash attention runs on NVIDIA GPUs only: on the GPU machine `MEDKD_FLASH_ATTN=1 bash "
                        f"launch/setup.sh` builds it; here, {without}")
        return fail("attention", "; ".join(problems),
                    f"`MEDKD_FLASH_ATTN=1 bash launch/setup.sh` builds flash-attn against torch {torch_version} "
                    f"(CUDA {torch_cuda}); or {without}")
    return ok("attention", ", ".join(f"{step} {impl}" for step, impl in named.items()) + f" (torch {torch_version})")


def check_bitsandbytes(steps: Sequence[StepNeeds], gpus: Sequence[Gpu], module: str = "bitsandbytes") -> CheckResult:
    """A 4-bit recipe needs bitsandbytes' CUDA kernels: quantise and dequantise one bf16 block on GPU 0."""
    wants = [step.name for step in steps if step.four_bit]
    if not wants:
        return ok("bitsandbytes", "no 4-bit step")
    fix = ("`.venv/bin/pip install -c constraints.txt bitsandbytes` (its wheel carries CUDA kernels for "
           "CUDA 11.8-13), or a bf16 LoRA recipe")
    problem = module_problem(module)
    if problem:
        return fail("bitsandbytes", f"{', '.join(wants)} load 4-bit weights but `import {module}` fails ({problem})",
                    fix)
    if not gpus:
        return skip("bitsandbytes", f"imports; its CUDA kernels need a GPU ({', '.join(wants)} load 4-bit weights)")
    try:
        import torch
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        block = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        packed, state = quantize_4bit(block, quant_type="nf4")
        error = (dequantize_4bit(packed, state) - block).abs().mean().item()
    except Exception as err:
        return fail("bitsandbytes", f"its CUDA kernels fail on {gpus[0].name}: {type(err).__name__}: {err}", fix)
    return ok("bitsandbytes", f"NF4 quantise/dequantise on {gpus[0].name} (mean error {error:.3f})")


def pinned_version(package: str, constraints: Path = REPO_ROOT / "constraints.txt") -> str | None:
    for line in constraints.read_text(encoding="utf-8").splitlines():
        if line.split("#")[0].strip().startswith(f"{package}=="):
            return line.split("#")[0].strip().split("==", 1)[1]
    return None


def start_vllm_import(python: str | None) -> subprocess.Popen | None:
    """`import vllm` in PYTHON, started now and read by check_vllm: its seconds of CPU overlap the other checks
    (the pipeline runs the doctor before every run)."""
    if python is None or not Path(python).exists():
        return None
    return subprocess.Popen([python, "-c", "import vllm; print(vllm.__version__)"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def check_vllm(python: str | None, pinned: str | None, timeout_s: float = 120,
               started: subprocess.Popen | None = None) -> CheckResult:
    """PYTHON (the vLLM environment's interpreter; None when prep.api.serving.vllm_python found none) imports vllm
    at the PINNED version (STARTED: that import, already running)."""
    # setup.sh leaves an environment whose stamp matches alone, so a broken or other vLLM needs the folder gone first.
    fix = "rm -rf .venv-vllm && bash launch/setup.sh (it builds .venv-vllm with the pinned vLLM)"
    process = started or start_vllm_import(python)
    if process is None:
        return fail("vllm", f"{python or '.venv-vllm/bin/python'}: the vLLM environment is missing",
                    "bash launch/setup.sh without MEDKD_SKIP_VLLM=1 (it builds .venv-vllm with the pinned vLLM)")
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return fail("vllm", f"`import vllm` took over {timeout_s:.0f} s in {python}", fix)
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return fail("vllm", f"`import vllm` fails in {python}: {last}", fix)
    version = stdout.strip().splitlines()[-1]
    if pinned and version.split("+")[0] != pinned:
        return fail("vllm", f"vllm {version} in {python}, constraints.txt pins {pinned}", fix)
    return ok("vllm", f"vllm {version} imports ({python})")


def _allreduce_worker(rank: int, world: int, backend: str, port: int, report: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    elements = (64 << 20) // 4 if backend == "nccl" else 1 << 16
    tensor = torch.full((elements,), float(rank + 1), device=device)
    dist.all_reduce(tensor)
    expected = world * (world + 1) / 2
    if tensor[0].item() != expected or tensor[-1].item() != expected:
        raise RuntimeError(f"all-reduce gave {tensor[0].item()}, expected {expected}")
    started = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(tensor)
    if backend == "nccl":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / 5
    if rank == 0:
        # Bus bandwidth as nccl-tests reports it: 2 (n - 1) / n of the buffer crosses each link.
        Path(report).write_text(json.dumps({"busbw_gbs": tensor.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9}))
    dist.destroy_process_group()


def check_allreduce(world: int, backend: str = "nccl", timeout_s: float = 90) -> CheckResult:
    """WORLD processes (one per GPU for nccl; gloo runs on the CPU) all-reduce a buffer and check the sum."""
    from prep.api.process import free_port

    name = backend.upper()
    if world < 2:
        return ok(name.lower(), f"{world} GPU: no all-reduce between GPUs")
    code = ("import sys; from custom_losses.checks.machine import _allreduce_worker as w; "
            "w(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(world), backend, str(port), str(report)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
        deadline, outputs = time.monotonic() + timeout_s, []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                return fail(name.lower(), f"all-reduce across {world} processes hung past {timeout_s:.0f} s",
                            "NCCL_DEBUG=INFO python -m launch.doctor ... shows where; on PCIe boxes try "
                            "NCCL_P2P_DISABLE=1, in containers raise --shm-size")
        failed = [(proc.returncode, out) for proc, out in zip(procs, outputs) if proc.returncode != 0]
        if failed or not report.exists():
            tail = (failed[0][1].strip().splitlines() or ["no output"])[-1] if failed else "no report"
            return fail(name.lower(), f"all-reduce across {world} processes failed: {tail}",
                        "NCCL_DEBUG=INFO python -m launch.doctor ... shows why; check the driver and that "
                        "every GPU is visible (CUDA_VISIBLE_DEVICES)")
        bandwidth = json.loads(report.read_text())["busbw_gbs"]
    return ok(name.lower(), f"all-reduce across {world} {'GPUs' if backend == 'nccl' else 'processes'}: "
              f"{bandwidth:.1f} GB/s bus bandwidth")


def check_disk(folder: str | Path, min_free_gb: float) -> CheckResult:
    """The run folder's disk has the recipe's min_free_disk_gb free."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    free = free_gib(path)
    if free < min_free_gb:
        return fail("disk", f"{free:.1f} GiB free at {path}, the recipe asks for min_free_disk_gb={min_free_gb:g}",
                    f"free {min_free_gb - free:.1f} GiB there, or point `out` at a bigger disk (--set out=/big/run)")
    return ok("disk", f"{free:.1f} GiB free at {path} (the recipe asks for {min_free_gb:g})")


def check_model(name: str, offline: bool, hub_timeout_s: float = 20, key: str = "the recipe's model") -> CheckResult:
    """NAME (the recipe's KEY) is the tiny fixture, a complete local folder, in the HF cache, or (when not OFFLINE) on
    the hub: prep.api.preconditions.model_problem, the check the commands make before they start, then (online) one
    hub lookup."""
    from prep.testing.tiny_model import TINY_MODEL_NAME

    label = f"model {name}"
    if name == TINY_MODEL_NAME:
        return ok(label, "the tiny fixture (built locally by prep.testing.tiny_model)")
    problem = model_problem(name, key, offline)
    if problem:
        return fail(label, problem.detail, problem.fix)
    local = resolve_path(name)
    if local.is_dir():
        return ok(label, f"local folder {local}")
    cached = cached_snapshot(name)
    if cached:
        return ok(label, f"in the HF cache ({cached})")
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(name, timeout=hub_timeout_s, files_metadata=True)
        size = sum(sibling.size or 0 for sibling in info.siblings or [] if sibling.rfilename.endswith(".safetensors"))
    except Exception as err:
        return fail(label, f"not local and the hub lookup failed: {type(err).__name__}: {str(err).splitlines()[0]}",
                    "check the id, the network and HF_TOKEN (gated models need an accepted licence)")
    return ok(label, f"on the hub, not cached: {size / 1e9:.1f} GB downloads on first use (HF_HUB_OFFLINE=0)")
