"""tunewise: fine-tune causal LMs with the training loop and hyperparameters checked and diagnosed.

`tunewise.watch(trainer)` attaches the live doctor to a Trainer script (tunewise.training.watch); it is
imported on first use, so `import tunewise` stays light (no torch, no transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunewise.training.watch import watch

__version__ = "0.1.0"
__all__ = ["watch"]


def __getattr__(name: str) -> Any:
    if name == "watch":
        from tunewise.training.watch import watch

        return watch
    raise AttributeError(f"module 'tunewise' has no attribute {name!r}")
