"""The loss benchmark's four variants and how one is measured (peak memory, time) in a fresh process.

Used by `python -m launch.bench_kd_loss`; see that command for what the variants are and what it prints.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from custom_losses.kd.kd_loss import KDLossConfig, weighted_topk_kd_loss
from prep.api.process import stderr_silenced

QWEN25_7B_HIDDEN = 3584
CPU_DEFAULT_HIDDEN = 256
TRL_CHUNK = 256  # trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE in TRL 1.9.0
ALPHA = 0.5
VARIANTS = ("kd_chunked", "kd_naive", "ce_trl", "ce_naive")
# Axolotl 0.19's fused top-k KD kernel (axolotl.integrations.kd): measured where Axolotl imports (launch.bench_gpu).
AXOLOTL_VARIANT = "kd_axolotl"


# --------------------------------------------------------------------------------------------------------------
# Inputs and the four losses
# --------------------------------------------------------------------------------------------------------------


def make_inputs(n: int, hidden: int, vocab: int, k: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Deterministic inputs; teacher top-k are random distinct-ish ids with log-probs of a peaked distribution."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen) / hidden**0.25
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.25
    target = torch.randint(0, vocab, (n,), generator=gen)
    topk_ids = torch.randint(0, vocab, (n, k), generator=gen)
    topk_ids[:, 0] = target  # the answer token is usually the teacher's favourite
    topk_lp = torch.log_softmax(torch.randn(n, k, generator=gen) * 2.0, dim=-1) - 0.1
    return {
        "hidden": h.to(device=device, dtype=dtype).requires_grad_(True),
        "weight": w.to(device=device, dtype=dtype).requires_grad_(True),
        "target": target.to(device),
        "topk_ids": topk_ids.to(device),
        "topk_lp": topk_lp.to(device),
        "weights": torch.ones(n, device=device),
    }


def loss_kd_chunked(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    cfg = KDLossConfig(alpha=ALPHA, temperature=1.0, divergence="forward_kl", support="renorm", chunk_size=chunk)
    loss, _ = weighted_topk_kd_loss(x["hidden"], x["weight"], x["target"], x["topk_ids"], x["topk_lp"], x["weights"], cfg)
    return loss


def loss_kd_naive(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    logits = (x["hidden"] @ x["weight"].T).float()
    logp = torch.log_softmax(logits, dim=-1)
    student_top = torch.log_softmax(logp.gather(1, x["topk_ids"]), dim=-1)  # renormalised over the top-k
    teacher_top = torch.log_softmax(x["topk_lp"], dim=-1)
    kd = (teacher_top.exp() * (teacher_top - student_top)).sum(-1).mean()
    ce = -logp.gather(1, x["target"][:, None]).mean()
    return ALPHA * kd + (1.0 - ALPHA) * ce


def _trl_chunked_ce() -> tuple[Callable, str]:
    """TRL's own chunked CE if importable, else a copy of its algorithm (checkpointed 256-token chunks)."""
    try:
        with stderr_silenced():
            from trl.trainer.sft_trainer import _chunked_cross_entropy_loss

        return _chunked_cross_entropy_loss, "trl.trainer.sft_trainer._chunked_cross_entropy_loss"
    except ImportError:
        pass

    def _chunk(h, w, lbl):
        logits = h.float() @ w.float().t()
        return F.nll_loss(F.log_softmax(logits, dim=-1), lbl, reduction="sum")

    def reimplemented(hidden_states, lm_head_weight, chunk_size, shift_labels):
        hidden, labels = hidden_states.reshape(-1, hidden_states.shape[-1]), shift_labels.reshape(-1)
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            loss = loss + torch.utils.checkpoint.checkpoint(_chunk, hidden[sl], lm_head_weight, labels[sl], use_reentrant=False)
        return loss / hidden.shape[0], None, None, None

    return reimplemented, "a re-implementation of TRL 1.9's chunked_nll (TRL not importable)"


def loss_ce_trl(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    fn, _ = _trl_chunked_ce()
    loss, *_ = fn(x["hidden"][None], x["weight"], TRL_CHUNK, shift_labels=x["target"][None])
    return loss


def loss_ce_naive(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    logits = (x["hidden"] @ x["weight"].T).float()
    return F.cross_entropy(logits, x["target"])


def _axolotl_kd(compiled: bool) -> Callable:
    with stderr_silenced():
        from axolotl.integrations.kd.kernels.liger import LigerFusedLinearKLTopKLogprobLoss

    # kd_alpha ALPHA, kd_ce_alpha 1 - ALPHA, forward KL (beta 0), the student renormalised over the top-k (our
    # renorm support); compiled under inductor as Axolotl runs it on a GPU, plain torch on a CPU.
    return LigerFusedLinearKLTopKLogprobLoss(1.0 - ALPHA, ALPHA, 1.0, 0.0, compiled=compiled, chunk_size=TRL_CHUNK,
                                             compute_ce_loss=True, normalize_topk=True)


def loss_kd_axolotl(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """Axolotl's fused top-k KD on the same inputs: the teacher's top-k renormalised (as medkd's export writes
    them), every alternative unmasked, chunks of CHUNK tokens. The kernel sums over tokens (AxolotlKDTrainer divides
    by the batch's token count afterwards), so it is divided by N here: the same scale as the others."""
    fn = _axolotl_kd(compiled=x["hidden"].is_cuda)
    fn.chunk_size = chunk
    teacher = torch.log_softmax(x["topk_lp"], dim=-1)
    return fn(x["weight"], x["hidden"][None], x["topk_ids"][None], teacher[None], torch.ones_like(teacher)[None].bool(),
              x["target"][None]) / x["target"].numel()


LOSSES = {"kd_chunked": loss_kd_chunked, "kd_axolotl": loss_kd_axolotl, "kd_naive": loss_kd_naive, "ce_trl": loss_ce_trl, "ce_naive": loss_ce_naive}


# --------------------------------------------------------------------------------------------------------------
# Measuring (runs inside a fresh process)
# --------------------------------------------------------------------------------------------------------------


def cpu_rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_cpu_peak() -> None:
    # Writing 5 to clear_refs resets the process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(variant: str, n: int, hidden: int, vocab: int, k: int, device: str, dtype_name: str, chunk: int, repeats: int) -> dict:
    """Peak extra memory of the first forward + backward, then the median time of `repeats` more."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    fn = LOSSES[variant]
    source = ""
    if variant == "ce_trl":
        _, source = _trl_chunked_ce()  # imported before the baseline: the import is not the loss's memory
    if variant == AXOLOTL_VARIANT:
        _axolotl_kd(compiled=False)
        source = "axolotl.integrations.kd.kernels.liger.LigerFusedLinearKLTopKLogprobLoss"
    x = make_inputs(n, hidden, vocab, k, device, dtype)
    # Warm-up on a few tokens: kernels and allocator pools set up outside the measured peak.
    small = {key: (val.detach()[:8].requires_grad_(val.requires_grad) if key != "weight" else val) for key, val in x.items()}
    fn(small, chunk).backward()
    x["weight"].grad = None

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_cpu_peak()
        base = cpu_rss_bytes("VmRSS")
    loss = fn(x, chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_rss_bytes("VmHWM") - base
    loss_value = float(loss.detach())

    times = []
    for _ in range(repeats):
        x["hidden"].grad = x["weight"].grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x, chunk).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "time_s": statistics.median(times), "loss": loss_value, "source": source}


def measure_in_fresh_process(*args) -> dict | None:
    ctx = mp.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(measure, *args).result()
    except concurrent.futures.process.BrokenProcessPool:
        return None  # killed, most likely out of memory
