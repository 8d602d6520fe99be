"""medkd's training side: the distillation unit, what trains around it, the pipeline that runs every stage, checks.

    kd/        the weighted top-k KD loss, token weights, packing and TRL's trainer subclass (stage two)
    train/     SFT config and preflight (stage one), distill, merge, the memory model, the launcher, checkpoints
    pipeline/  the pipeline's recipe, plan, steps and recipe catalogue; pipeline.run runs the doctor, then the steps
    checks/    the doctor, the real-shape smoke steps and the GPU, loss and distill benchmarks

The loss's names are importable from the package itself; they load torch on first use only, so the
commands that only compose or check a recipe start quickly.
"""

__all__ = ["KDLossConfig", "TAIL_EPS", "weighted_topk_kd_loss"]


def __getattr__(name: str):
    if name in __all__:
        import custom_losses.kd.kd_loss

        return getattr(custom_losses.kd.kd_loss, name)
    raise AttributeError(f"module 'custom_losses' has no attribute {name!r}")
