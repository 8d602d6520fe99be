"""What trains around the loss: the SFT config and preflight, distill, merge, the memory model, the launcher, checkpoints."""
