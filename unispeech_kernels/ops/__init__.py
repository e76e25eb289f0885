"""One op per file: torch reference, kernels, launchers, autograd, torch.library op, entry point."""
