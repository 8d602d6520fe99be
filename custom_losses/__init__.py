"""Losses for distilling the teacher into the student that the stock trainers do not provide."""

from custom_losses.kd_loss import TAIL_EPS, KDLossConfig, weighted_topk_kd_loss

__all__ = ["KDLossConfig", "TAIL_EPS", "weighted_topk_kd_loss"]
