"""The distillation unit: the weighted top-k KD loss, token weights, packing and TRL's trainer subclass."""
