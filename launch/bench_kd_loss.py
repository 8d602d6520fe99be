"""Measure the peak memory and time of forward + backward for our chunked top-k KD loss against the same loss
through full logits and against TRL's chunked cross-entropy, on the same random inputs. It shows what the chunked
loss saves at Qwen2.5's vocabulary size.

Reads: its flags only (random inputs).
Writes: the table and the summary line on stdout; nothing on disk.

Example:
    python -m launch.bench_kd_loss --device cpu --seqs 256 --vocab 4096 --hidden 64

Variants, all on the same inputs (answer-position hidden states [N, H], lm_head weight [V, H], targets,
teacher top-k ids/log-probs), each differentiated wrt hidden and weight:
  (a) kd_chunked   custom_losses.weighted_topk_kd_loss (alpha 0.5, T 1, forward KL, renorm support)
  (b) kd_naive     the same loss through full logits: h @ W.T for every position, log_softmax over [N, V],
                   gather the top-k, forward KL + CE, autograd
  (c) ce_trl       plain CE the way TRL 1.9 computes it by default (SFTConfig loss_type="chunked_nll"):
                   trl.trainer.sft_trainer._chunked_cross_entropy_loss, chunks of 256 tokens under
                   gradient checkpointing
  (d) ce_naive     plain CE through full logits and F.cross_entropy
  (e) kd_axolotl   with --axolotl: Axolotl 0.19's fused top-k KD kernel on the same inputs (compiled on cuda),
                   divided by the token count (the kernel sums; Axolotl's trainer divides afterwards)

(a) and (b) compute the same loss, as do (c) and (d); the table prints the losses so that can be checked.
Every measurement runs in a fresh process (multiprocessing spawn) so peaks do not leak between variants.
The last line, for the longest sequence, is `mem_vs_ce=A mem_vs_naive=B time_vs_ce=C` with
A = peak(a) / peak(c), B = peak(a) / peak(b), C = time(a) / time(c); with --axolotl it adds
`mem_vs_axolotl=D time_vs_axolotl=E` (peak(a) / peak(e), time(a) / time(e)).
"""

from __future__ import annotations

import sys

import torch

from custom_losses.checks.loss_bench import (
    AXOLOTL_VARIANT,
    CPU_DEFAULT_HIDDEN,
    QWEN25_7B_HIDDEN,
    TRL_CHUNK,
    VARIANTS,
    measure_in_fresh_process,
)
from prep.cli import command_parser
from prep.qwen import VOCAB_ROWS


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("launch.bench_kd_loss", __doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to measure (default: cuda when a GPU is visible)")
    parser.add_argument("--hidden", type=int, default=None, help=f"default {QWEN25_7B_HIDDEN} on cuda, {CPU_DEFAULT_HIDDEN} on cpu")
    parser.add_argument("--seqs", default="2048,4096", help="answer-token counts, comma separated")
    parser.add_argument("--vocab", type=int, default=VOCAB_ROWS, help=f"vocabulary rows (default {VOCAB_ROWS})")
    parser.add_argument("--k", type=int, default=20, help="teacher top-k per position (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5 cuda, 1 cpu)")
    parser.add_argument("--chunk", type=int, default=TRL_CHUNK, help="tokens per chunk of our loss (default: TRL's 256)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--axolotl", action="store_true", help="also Axolotl's fused top-k KD kernel (needs axolotl)")
    args = parser.parse_args(argv)
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
        for variant in [*VARIANTS, *([AXOLOTL_VARIANT] if args.axolotl else [])]:
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
    line = f"mem_vs_ce={ratio(a, c, 'peak_bytes')} mem_vs_naive={ratio(a, b, 'peak_bytes')} time_vs_ce={ratio(a, c, 'time_s')}"
    if args.axolotl:
        e = results[(n, AXOLOTL_VARIANT)]
        line += f" mem_vs_axolotl={ratio(a, e, 'peak_bytes')} time_vs_axolotl={ratio(a, e, 'time_s')}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
