"""tunewise: fine-tune causal LMs with the training loop and hyperparameters checked and diagnosed."""

__version__ = "0.1.0"
