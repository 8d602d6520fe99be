"""Weighted top-k distillation loss computed from hidden states, never from [N, V] logits.

The teacher (served by vLLM) gives us, for every answer token, its top-k token ids and log-probs. The student
is Qwen2.5-7B-Instruct, whose vocabulary has ~152k entries: materialising logits for a 4k-token answer batch
would cost 4096 * 152064 * 4 bytes = 2.5 GB per copy, and autograd through log_softmax keeps several copies.
So, following Liger's "fused linear cross entropy", the loss takes the final hidden states of the answer
positions and the lm_head weight, and walks over chunks of tokens: each chunk's logits are computed, turned
into the loss *and* into the gradients wrt the chunk's hidden states and the weight on the spot, then
dropped. Backward only rescales the stored gradients. Peak extra memory is O(chunk_size * V), not O(N * V).

Per answer token t (S_t = the teacher's top-k support, T = distillation temperature):

    L = alpha * T^2 * sum_t w_t KD_t / normaliser + (1 - alpha) * sum_t w_t CE_t / normaliser

with KD_t a divergence between the teacher's and the student's distributions restricted to S_t (see
KDLossConfig.support) and CE_t the ordinary temperature-1 cross-entropy on the answer token. The gradients are
derived by hand (see _kd_grad_wrt_scaled_logits); tests/test_kd_loss.py checks them against autograd on a
float64 loop-by-loop reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KDLossConfig", "weighted_topk_kd_loss", "TAIL_EPS"]

# Floor of the tail bucket's probability (teacher and student) in support="tail". In float32 the tail is
# 1 - (sum of k probabilities), whose rounding error is ~k * 6e-8, so anything below ~1e-6 is noise anyway.
TAIL_EPS = 1e-6

_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_SUPPORTS = ("renorm", "tail")


@dataclass(frozen=True)
class KDLossConfig:
    """Hyper-parameters of weighted_topk_kd_loss.

    alpha: weight of the KD term; 1 - alpha weighs the cross-entropy on the answer tokens.
    temperature: distillation temperature T; both distributions are softened by it and the KD term is scaled
        by T^2 so its gradient magnitude does not shrink with T (Hinton et al., 2015).
    divergence: "forward_kl" = KL(q || p) (mode-covering, the classic choice), "reverse_kl" = KL(p || q)
        (mode-seeking), "jsd" = generalised Jensen-Shannon with mixing beta.
    beta: generalised-JSD mixing, TRL GKD convention: beta=0 is forward KL, beta=1 is reverse KL.
    support: how the mass outside the teacher's top-k is handled. "renorm": teacher and student are both
        renormalised over S_t (the tail is ignored). "tail": one extra category holds 1 - sum over S_t, so a
        student that puts too much (or too little) mass outside the teacher's top-k is penalised.
    chunk_size: tokens per chunk; peak extra memory is about 2-3 * chunk_size * V * 4 bytes.
    rho_keep_fraction: Rho-1 style token selection (Lin et al., 2024): keep only this fraction of the weighted
        tokens, those whose student CE exceeds the teacher's CE the most. 1.0 turns it off.
    """

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    support: str = "renorm"
    chunk_size: int = 1024
    rho_keep_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KDLossConfig.alpha must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"KDLossConfig.temperature must be a finite number > 0, got {self.temperature}")
        if self.divergence not in _DIVERGENCES:
            raise ValueError(f"KDLossConfig.divergence must be one of {_DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"KDLossConfig.beta must be in [0, 1], got {self.beta}")
        if self.support not in _SUPPORTS:
            raise ValueError(f"KDLossConfig.support must be one of {_SUPPORTS}, got {self.support!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"KDLossConfig.chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if not 0.0 < self.rho_keep_fraction <= 1.0:
            raise ValueError(f"KDLossConfig.rho_keep_fraction must be in (0, 1], got {self.rho_keep_fraction}")

    @property
    def effective_divergence(self) -> str:
        """The divergence actually computed: jsd with beta 0 or 1 is exactly forward or reverse KL (as in TRL)."""
        if self.divergence == "jsd" and self.beta == 0.0:
            return "forward_kl"
        if self.divergence == "jsd" and self.beta == 1.0:
            return "reverse_kl"
        return self.divergence


# --------------------------------------------------------------------------------------------------------------
# Small pieces over [C, k] tensors
# --------------------------------------------------------------------------------------------------------------


def _masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """log_softmax over the valid entries of each row; invalid entries (and rows with none valid) give 0.

    Zeros rather than -inf so later products like q * log q stay finite without further masking.
    """
    x = x.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (x - lse).masked_fill(~valid, 0.0)


def _teacher_log_q(
    topk_ids: Tensor, topk_logprobs: Tensor, config: KDLossConfig, teacher_temperature: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Teacher log-distribution over the KD categories, re-tempered from tau to T.

    Returns (log_q, valid), both [N, K] with K = k ("renorm") or k + 1 ("tail", last column = tail bucket).
    An entry is valid when its id is >= 0 and its log-prob finite: vLLM pads short top-k lists, and an entry
    of probability 0 could only make reverse KL infinite. Rows with no valid entry are all-invalid, so they
    contribute exactly 0 to KD.

    Re-tempering: log-probs at tau are logits up to a per-row constant, so softmax(l * tau / T) is exactly
    the teacher at temperature T restricted to S_t. For the tail bucket this is the *definition* we use when
    tau != T (the tail's true re-tempered mass would need the teacher's full distribution); when tau == T it
    is exact.
    """
    logprobs = topk_logprobs.to(dtype)
    valid = (topk_ids >= 0) & torch.isfinite(logprobs)
    logprobs = logprobs.masked_fill(~valid, 0.0)
    if config.support == "tail":
        top_mass = (logprobs.exp() * valid).sum(dim=-1, keepdim=True)
        tail = torch.log((1.0 - top_mass).clamp(min=TAIL_EPS))
        logprobs = torch.cat([logprobs, tail], dim=-1)
        valid = torch.cat([valid, valid.any(dim=-1, keepdim=True)], dim=-1)
    scale = teacher_temperature / config.temperature
    return _masked_log_softmax(logprobs * scale, valid), valid


def _divergence(log_q: Tensor, log_p: Tensor, valid: Tensor, config: KDLossConfig) -> tuple[Tensor, Tensor]:
    """KD_t and dKD_t/dlog_p for categorical q (teacher) and p (student) given in log space.

    Invalid entries hold log value 0 and get probability 0, so they drop out of every sum.
    JSD follows TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py, TRL 1.9.0):
    m = beta * q + (1 - beta) * p, jsd = beta * KL(q || m) + (1 - beta) * KL(p || m), with beta == 0 and
    beta == 1 special-cased to forward KL(q || p) and reverse KL(p || q) (the general formula would give 0).
    """
    q = log_q.exp() * valid
    p = log_p.exp() * valid
    kind = config.effective_divergence
    if kind == "forward_kl":
        kd = (q * (log_q - log_p)).sum(dim=-1)
        grad = -q
    elif kind == "reverse_kl":
        kd = (p * (log_p - log_q)).sum(dim=-1)
        grad = p * (log_p - log_q + 1.0)
    else:
        beta = config.beta
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        kd = beta * (q * (log_q - log_m)).sum(dim=-1) + (1.0 - beta) * (p * (log_p - log_m)).sum(dim=-1)
        # d/dlog_p_j of the sum: the two terms through m cancel against the +p_j from d(p log p), leaving this.
        grad = (1.0 - beta) * p * (log_p - log_m)
    return kd, grad * valid


def _student_log_p(
    z: Tensor, lse1: Tensor, ids: Tensor, valid: Tensor, config: KDLossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Student log-probabilities over the KD categories from the chunk logits z [C, V].

    p = softmax(z / T) over the full vocabulary, restricted to S_t. "renorm" renormalises over S_t (only the
    gathered logits matter). "tail" keeps p_j on S_t and adds p_tail = 1 - sum_{S_t} p_j, floored at TAIL_EPS
    (cheaper than a masked logsumexp over the other V - k entries, and equal to it up to that floor).
    Returns log_p [C, K] and what the gradient needs.
    """
    T = config.temperature
    z_top = z.gather(1, ids) / T
    if config.support == "renorm":
        log_p = _masked_log_softmax(z_top, valid)
        return log_p, {}
    valid_top = valid[:, :-1]
    lse_T = lse1 if T == 1.0 else torch.logsumexp(z / T, dim=-1)
    log_p_top = (z_top - lse_T[:, None]).masked_fill(~valid_top, 0.0)
    p_top = log_p_top.exp() * valid_top
    top_mass = p_top.sum(dim=-1)
    tail_raw = 1.0 - top_mass
    p_tail = tail_raw.clamp(min=TAIL_EPS)
    log_p = torch.cat([log_p_top, p_tail.log()[:, None]], dim=-1).masked_fill(~valid, 0.0)
    extras = {"lse_T": lse_T, "p_top": p_top, "top_mass": top_mass, "p_tail": p_tail, "unclamped": tail_raw > TAIL_EPS}
    return log_p, extras


def _kd_grad_wrt_scaled_logits(
    grad_log_p: Tensor, log_p: Tensor, valid: Tensor, extras: dict[str, Tensor], config: KDLossConfig
) -> tuple[Tensor, Tensor | None]:
    """Chain rule from dKD/dlog_p to dKD/d(z/T), split into a sparse part on S_t and a dense part.

    Returns (sparse [C, k], dense_coef [C] or None) with dKD/d(z_v/T) = sparse at v in S_t (scatter-added)
    + dense_coef * softmax(z/T)_v for every v.

    renorm: log_p = log_softmax over S_t of z/T, so the Jacobian is (I - p) on S_t and nothing elsewhere.
    tail:   log p_j = z_j/T - lse(z/T) gives d/d(z_v/T) = [v = j] - pT_v; p_tail = 1 - sum_j p_j gives
            dp_tail/d(z_v/T) = top_mass * pT_v - [v in S_t] pT_v. With r = g_tail / p_tail (0 where the floor
            is active, as the clamp's derivative is 0) and G = sum_j g_j that sums to
            (g_j - r p_j) on S_t plus (r * top_mass - G) * pT_v everywhere.
    """
    if config.support == "renorm":
        p = log_p.exp() * valid
        sparse = grad_log_p - p * grad_log_p.sum(dim=-1, keepdim=True)
        return sparse * valid, None
    g_top, g_tail = grad_log_p[:, :-1], grad_log_p[:, -1]
    r = torch.where(extras["unclamped"], g_tail / extras["p_tail"], torch.zeros_like(g_tail))
    sparse = (g_top - r[:, None] * extras["p_top"]) * valid[:, :-1]
    dense_coef = r * extras["top_mass"] - g_top.sum(dim=-1)
    return sparse, dense_coef


# --------------------------------------------------------------------------------------------------------------
# One chunk of tokens
# --------------------------------------------------------------------------------------------------------------


def _chunk_kd_ce(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ids: Tensor,
    log_q: Tensor,
    valid: Tensor,
    config: KDLossConfig,
    compute_dtype: torch.dtype,
    grad_scales: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """KD_t and CE_t for a chunk of C tokens, and optionally dL/dz [C, V] for the chunk.

    grad_scales = (ce_scale, kd_scale), each [C]: the factors of CE_t and KD_t in the total loss, i.e.
    (1 - alpha) * w_t / normaliser and alpha * T^2 * w_t / normaliser. The returned gradient reuses the
    chunk's logits buffer, so at most two [C, V] float buffers are alive at once.
    """
    T = config.temperature
    # Upcast so softmax and its gradient are float32 even for bf16 weights (the matmul itself stays in the
    # input dtype, as in the model's own lm_head).
    z = (h @ weight.T).to(compute_dtype)
    lse1 = torch.logsumexp(z, dim=-1)
    ce = lse1 - z.gather(1, target[:, None]).squeeze(1)
    valid_top = valid[:, :-1] if config.support == "tail" else valid
    safe_ids = ids.clamp(min=0)  # padded entries point at token 0; they are masked out of every sum
    log_p, extras = _student_log_p(z, lse1, safe_ids, valid, config)
    kd, grad_log_p = _divergence(log_q, log_p, valid, config)
    if grad_scales is None:
        return kd, ce, None

    ce_scale, kd_scale = grad_scales
    sparse, dense_coef = _kd_grad_wrt_scaled_logits(grad_log_p, log_p, valid, extras, config)
    kd_scale_z = kd_scale / T  # d(z/T)/dz
    # dL/dz = ce_scale * (softmax(z) - onehot(y)) + kd_scale/T * (dense_coef * softmax(z/T) + scatter(sparse))
    row_scale = ce_scale
    dense_T = None
    if dense_coef is not None:
        if T == 1.0:
            row_scale = ce_scale + kd_scale_z * dense_coef  # softmax(z/T) is softmax(z): fold it in
        else:
            dense_T = z.div(T).sub_(extras["lse_T"][:, None]).exp_().mul_((kd_scale_z * dense_coef)[:, None])
    grad = z.sub_(lse1[:, None]).exp_().mul_(row_scale[:, None])  # z is dead from here on: reuse its memory
    if dense_T is not None:
        grad.add_(dense_T)
        del dense_T
    grad.scatter_add_(1, target[:, None], -ce_scale[:, None])
    grad.scatter_add_(1, safe_ids, (sparse * kd_scale_z[:, None]).masked_fill(~valid_top, 0.0))
    return kd, ce, grad


# --------------------------------------------------------------------------------------------------------------
# The fused forward/backward
# --------------------------------------------------------------------------------------------------------------


class _FusedLinearTopKKD(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients wrt hidden and lm_head weight.

    Gradients are exact for the loss as a function of (hidden, weight); the teacher inputs, targets and weights
    get none. Single backward only: the stored gradients are scaled in place and handed over.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        ids: Tensor,
        log_q: Tensor,
        valid: Tensor,
        ce_scale: Tensor,
        kd_scale: Tensor,
        config: KDLossConfig,
        compute_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_h else None
        # Accumulated in the weight's dtype (like autograd would) to avoid a second [V, H] float32 buffer.
        grad_weight = torch.zeros_like(weight) if want_w else None
        kd = hidden.new_empty(n, dtype=compute_dtype)
        ce = hidden.new_empty(n, dtype=compute_dtype)
        for start in range(0, n, config.chunk_size):
            sl = slice(start, start + config.chunk_size)
            h_c = hidden[sl]
            kd[sl], ce[sl], grad_z = _chunk_kd_ce(
                h_c, weight, target[sl], ids[sl], log_q[sl], valid[sl], config, compute_dtype,
                grad_scales=(ce_scale[sl], kd_scale[sl]),
            )
            grad_z = grad_z.to(hidden.dtype)
            if want_h:
                grad_hidden[sl] = grad_z @ weight
            if want_w:
                grad_weight.addmm_(grad_z.T, h_c)
            del grad_z
        loss = (kd_scale * kd).sum() + (ce_scale * ce).sum()
        # Plain attributes, not save_for_backward: these are intermediates, and backward hands them over
        # (and drops its references) so the [V, H] buffer becomes .grad without another copy.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_kd: Tensor, _grad_ce: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("weighted_topk_kd_loss supports a single backward per forward (no retain_graph reuse)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # Scaled in place: a second [V, H] buffer would cost as much as the weight itself.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _chunked_kd_ce_no_grad(
    hidden: Tensor, weight: Tensor, target: Tensor, ids: Tensor, log_q: Tensor, valid: Tensor,
    config: KDLossConfig, compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Per-token KD_t and CE_t without any gradient work (evaluation)."""
    n = hidden.shape[0]
    kd = hidden.new_empty(n, dtype=compute_dtype)
    ce = hidden.new_empty(n, dtype=compute_dtype)
    with torch.no_grad():
        for start in range(0, n, config.chunk_size):
            sl = slice(start, start + config.chunk_size)
            kd[sl], ce[sl], _ = _chunk_kd_ce(
                hidden[sl], weight, target[sl], ids[sl], log_q[sl], valid[sl], config, compute_dtype
            )
    return kd, ce


# --------------------------------------------------------------------------------------------------------------
# Rho-1 token selection
# --------------------------------------------------------------------------------------------------------------


def _student_ce_no_grad(hidden: Tensor, weight: Tensor, target: Tensor, chunk_size: int, compute_dtype: torch.dtype) -> Tensor:
    ce = hidden.new_empty(hidden.shape[0], dtype=compute_dtype)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            z = (hidden[sl] @ weight.T).to(compute_dtype)
            ce[sl] = torch.logsumexp(z, dim=-1) - z.gather(1, target[sl, None]).squeeze(1)
            del z
    return ce


def _teacher_ce(target: Tensor, ids: Tensor, topk_logprobs: Tensor, dtype: torch.dtype) -> Tensor:
    """Teacher CE on the answer token from its top-k log-probs alone.

    When the target is in the top-k this is exact (at the teacher's sampling temperature). When it is not,
    the teacher's probability of it is at most the smallest top-k probability, so -min(top-k log-prob) is a
    lower bound of the teacher CE (and the excess loss an over-estimate: such tokens, where the student's
    answer token is off the teacher's list, lean towards being kept). Rows with no valid entry get 0, i.e.
    the excess is the student CE itself.
    """
    logprobs = topk_logprobs.to(dtype)
    valid = (ids >= 0) & torch.isfinite(logprobs)
    hit = valid & (ids == target[:, None])
    inf = torch.tensor(float("inf"), dtype=dtype, device=logprobs.device)
    target_lp = torch.where(hit, logprobs, -inf).max(dim=-1).values
    min_lp = torch.where(valid, logprobs, inf).min(dim=-1).values
    zero = torch.zeros_like(target_lp)
    return -torch.where(hit.any(dim=-1), target_lp, torch.where(valid.any(dim=-1), min_lp, zero))


def _rho_keep_mask(excess: Tensor, weights: Tensor, keep_fraction: float) -> Tensor:
    """Keep the ceil(keep_fraction * n) weighted tokens with the largest excess loss (n = tokens with w > 0)."""
    candidates = weights > 0
    n_candidates = int(candidates.sum().item())
    # The small offset stops float error (0.7 * 10 = 7.000000000000001) from keeping one token too many.
    n_keep = min(n_candidates, math.ceil(keep_fraction * n_candidates - 1e-9))
    keep = torch.zeros_like(candidates)
    if n_keep > 0:
        score = excess.masked_fill(~candidates, float("-inf"))
        keep[score.topk(n_keep).indices] = True
    return keep


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, weights: Tensor,
    teacher_temperature: float,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and lm_head_weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and lm_head_weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    n = hidden.shape[0]
    if target_ids.shape != (n,) or weights.shape != (n,):
        raise ValueError(f"target_ids and weights must be [N={n}]; got {tuple(target_ids.shape)} and {tuple(weights.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_logprobs must both be [N={n}, k]; got {tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64) or target_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token ids must be int32 or int64; got {target_ids.dtype} and {topk_ids.dtype}")
    if not (teacher_temperature > 0.0 and math.isfinite(teacher_temperature)):
        raise ValueError(f"teacher_temperature must be a finite number > 0, got {teacher_temperature}")


def weighted_topk_kd_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    target_ids: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    weights: Tensor,
    config: KDLossConfig,
    teacher_temperature: float = 1.0,
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted mix of top-k distillation and cross-entropy over the answer tokens, without [N, V] logits.

    Args:
        hidden: [N, H] final hidden states at the answer positions only, already shifted: row t predicts
            target_ids[t]. Gathering them first keeps the prompt tokens out of the lm_head entirely.
        lm_head_weight: [V, H] output projection (same dtype as hidden; float32 math is used inside).
        target_ids: [N] answer token ids, the CE target (must be valid ids, no -100).
        topk_ids: [N, k] teacher top-k ids; -1 marks padding when a position had fewer than k.
        topk_logprobs: [N, k] teacher log-probs at temperature teacher_temperature; -inf/NaN allowed at padding.
        weights: [N] per-token weights >= 0 (0 = the token contributes nothing, and no NaN either).
        config: see KDLossConfig.
        teacher_temperature: tau, the temperature the teacher log-probs were computed at; they are re-tempered
            to config.temperature.
        normaliser: the sum of weights over the whole accumulated batch (all micro-batches, all ranks), so
            that summing the gradients of micro-batches equals the gradient of one big batch (the same trick as
            transformers' num_items_in_batch). None = the local sum of weights. With Rho-1 selection on, a given
            normaliser is multiplied by rho_keep_fraction, which makes accumulation only approximately equal to
            one big batch (each micro-batch keeps ceil(fraction * its count) tokens, with their own weights).

    Returns:
        loss: scalar (float32, float64 for float64 inputs), differentiable wrt hidden and lm_head_weight.
        stats: detached {"kd", "ce"} = weighted means of the raw KD_t (no T^2, no alpha) and CE_t over the local
            (selected) tokens, "weight_sum" = local sum of (selected) weights, "selected_fraction" = kept /
            weighted tokens under Rho-1 (1 when off or when no token has weight).

    Gradients are computed during the forward (per chunk) when grad mode is on and hidden or lm_head_weight
    requires grad; otherwise only the values are computed. Rho-1 selection costs one extra no-grad pass over
    the lm_head (it needs every token's student CE before choosing). Assumes a row's valid top-k ids are
    distinct, as a teacher's top-k always are.

    Long because this docstring is the loss's public contract (every argument's shape, dtype and meaning);
    the body is one straight sequence (inputs, Rho-1 selection, scales, the fused or no-grad pass, stats) of
    under fifty lines sharing a dozen local tensors.
    """
    _check_inputs(hidden, lm_head_weight, target_ids, topk_ids, topk_logprobs, weights, teacher_temperature)
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    device = hidden.device
    target = target_ids.to(device=device, dtype=torch.int64)
    ids = topk_ids.to(device=device, dtype=torch.int64)
    topk_logprobs = topk_logprobs.to(device)
    weights = weights.detach().to(device=device, dtype=compute_dtype)
    log_q, valid = _teacher_log_q(ids, topk_logprobs, config, teacher_temperature, compute_dtype)

    n_weighted = (weights > 0).sum()
    if config.rho_keep_fraction < 1.0:
        student_ce = _student_ce_no_grad(hidden.detach(), lm_head_weight.detach(), target, config.chunk_size, compute_dtype)
        excess = student_ce - _teacher_ce(target, ids, topk_logprobs, compute_dtype)
        weights = weights * _rho_keep_mask(excess, weights, config.rho_keep_fraction)
        if normaliser is not None:
            normaliser = normaliser * config.rho_keep_fraction
    n_kept = (weights > 0).sum()
    weight_sum = weights.sum()

    norm = weight_sum if normaliser is None else torch.as_tensor(normaliser, dtype=compute_dtype, device=device)
    # An all-zero-weight micro-batch gives loss 0 and zero gradients rather than 0/0.
    inv_norm = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    T = config.temperature
    ce_scale = (1.0 - config.alpha) * weights * inv_norm
    kd_scale = config.alpha * T * T * weights * inv_norm

    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    if needs_grad:
        loss, kd, ce = _FusedLinearTopKKD.apply(
            hidden, lm_head_weight, target, ids, log_q, valid, ce_scale, kd_scale, config, compute_dtype
        )
    else:
        kd, ce = _chunked_kd_ce_no_grad(hidden, lm_head_weight, target, ids, log_q, valid, config, compute_dtype)
        loss = (kd_scale * kd).sum() + (ce_scale * ce).sum()

    inv_wsum = torch.where(weight_sum > 0, 1.0 / weight_sum, torch.zeros_like(weight_sum))
    stats = {
        "kd": ((weights * kd).sum() * inv_wsum).detach(),
        "ce": ((weights * ce).sum() * inv_wsum).detach(),
        "weight_sum": weight_sum.detach(),
        "selected_fraction": torch.where(
            n_weighted > 0, n_kept.to(compute_dtype) / n_weighted.clamp(min=1), torch.ones((), dtype=compute_dtype, device=device)
        ),
    }
    return loss, stats
