"""Peak memory and time of forward + backward: our chunked top-k KD loss vs full logits vs TRL's chunked CE.

    python -m launch.bench_kd_loss [--device cpu|cuda] [--hidden H] [--seqs 2048,4096] [--vocab 152064]
                                   [--k 20] [--repeats N] [--chunk C] [--dtype float32|bfloat16]

Variants, all on the same inputs (answer-position hidden states [N, H], lm_head weight [V, H], targets,
teacher top-k ids/log-probs), each differentiated wrt hidden and weight:
  (a) kd_chunked   custom_losses.weighted_topk_kd_loss (alpha 0.5, T 1, forward KL, renorm support)
  (b) kd_naive     the same loss through full logits: h @ W.T for every position, log_softmax over [N, V],
                   gather the top-k, forward KL + CE, autograd
  (c) ce_trl       plain CE the way TRL 1.9 computes it by default (SFTConfig loss_type="chunked_nll"):
                   trl.trainer.sft_trainer._chunked_cross_entropy_loss, chunks of 256 tokens under
                   gradient checkpointing
  (d) ce_naive     plain CE through full logits and F.cross_entropy

(a) and (b) compute the same loss, as do (c) and (d); the table prints the losses so that can be checked.
Every measurement runs in a fresh process (multiprocessing spawn) so peaks do not leak between variants.
The last line, for the longest sequence, is `mem_vs_ce=A mem_vs_naive=B time_vs_ce=C` with
A = peak(a) / peak(c), B = peak(a) / peak(b), C = time(a) / time(c).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

QWEN25_7B_HIDDEN = 3584
CPU_DEFAULT_HIDDEN = 256
TRL_CHUNK = 256  # trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE in TRL 1.9.0
ALPHA = 0.5
VARIANTS = ("kd_chunked", "kd_naive", "ce_trl", "ce_naive")


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
    from custom_losses.kd_loss import KDLossConfig, weighted_topk_kd_loss

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


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2: importing TRL prints a screenful of optional-kernel warnings (torchao, bitsandbytes)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _trl_chunked_ce() -> tuple[Callable, str]:
    """TRL's own chunked CE if importable, else a copy of its algorithm (checkpointed 256-token chunks)."""
    try:
        with _quiet_stderr():
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


LOSSES = {"kd_chunked": loss_kd_chunked, "kd_naive": loss_kd_naive, "ce_trl": loss_ce_trl, "ce_naive": loss_ce_naive}


# --------------------------------------------------------------------------------------------------------------
# Measuring (runs inside a fresh process)
# --------------------------------------------------------------------------------------------------------------


def _cpu_rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> None:
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
        _reset_cpu_peak()
        base = _cpu_rss_bytes("VmRSS")
    loss = fn(x, chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_rss_bytes("VmHWM") - base
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


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=None, help=f"default {QWEN25_7B_HIDDEN} on cuda, {CPU_DEFAULT_HIDDEN} on cpu")
    parser.add_argument("--seqs", default="2048,4096", help="answer-token counts, comma separated")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5 cuda, 1 cpu)")
    parser.add_argument("--chunk", type=int, default=TRL_CHUNK, help="tokens per chunk of our loss (default: TRL's 256)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default bfloat16 on cuda, float32 on cpu")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    hidden = args.hidden or (QWEN25_7B_HIDDEN if on_gpu else CPU_DEFAULT_HIDDEN)
    repeats = args.repeats or (5 if on_gpu else 1)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    seqs = [int(s) for s in args.seqs.split(",")]

    print(f"device={args.device} dtype={dtype} vocab={args.vocab} hidden={hidden} k={args.k} chunk(a)={args.chunk} chunk(c)={TRL_CHUNK}")
    if not on_gpu and hidden != QWEN25_7B_HIDDEN:
        print(f"note: hidden {hidden}, not Qwen2.5-7B's {QWEN25_7B_HIDDEN}, to keep a CPU run to a few minutes")
    if on_gpu:
        print("memory: torch.cuda.max_memory_allocated during one forward+backward minus memory_allocated with inputs ready")
    else:
        print("memory: peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS with inputs ready, fresh process each")
    print(f"time: median of {repeats} forward+backward after the measured one (which follows an 8-token warm-up)")

    results: dict[tuple[int, str], dict | None] = {}
    print(f"\n{'tokens':>7} {'variant':<11} {'peak MiB':>10} {'time s':>8} {'loss':>10}")
    for n in seqs:
        for variant in VARIANTS:
            r = measure_in_fresh_process(variant, n, hidden, args.vocab, args.k, args.device, dtype, args.chunk, repeats)
            results[(n, variant)] = r
            if r is None:
                print(f"{n:>7} {variant:<11} {'failed (OOM?)':>10}")
            else:
                print(f"{n:>7} {variant:<11} {r['peak_bytes'] / 2**20:>10.0f} {r['time_s']:>8.3f} {r['loss']:>10.4f}", flush=True)

    trl_sources = {r["source"] for (_, v), r in results.items() if v == "ce_trl" and r}
    print(f"(c) ran {', '.join(sorted(trl_sources)) or 'nowhere (failed)'}")
    n = max(seqs)
    a, b, c = (results[(n, v)] for v in ("kd_chunked", "kd_naive", "ce_trl"))
    ratio = lambda x, y, key: f"{x[key] / y[key]:.3f}" if x and y and y[key] > 0 else "nan"
    print(f"mem_vs_ce={ratio(a, c, 'peak_bytes')} mem_vs_naive={ratio(a, b, 'peak_bytes')} time_vs_ce={ratio(a, c, 'time_s')}")


if __name__ == "__main__":
    main()
