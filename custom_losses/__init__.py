"""medkd's training side: the weighted top-k distillation loss and what trains with it.

    kd_loss, token_weights, trainer   the loss, the token weights and TRL's trainer subclass (stage two)
    sft_config, sft_preflight         compose and check an Axolotl run (stage one)
    memory                            the GPU-memory estimator and the one fit check
    launcher                          how trainers start (python, accelerate) and where their logs go
    merge                             the one LoRA merge, for both stages
    distill                           stage two's recipe parsing and training loop

The loss's names are importable from the package itself; they load torch on first use only, so the
commands that only compose or check a recipe start quickly.
"""

__all__ = ["KDLossConfig", "TAIL_EPS", "weighted_topk_kd_loss"]


def __getattr__(name: str):
    if name in __all__:
        import custom_losses.kd.kd_loss

        return getattr(custom_losses.kd.kd_loss, name)
    raise AttributeError(f"module 'custom_losses' has no attribute {name!r}")
