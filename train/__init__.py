"""cxr-screen models, trainer, evaluation and screening on top of the shard format.

`from train import Screener` is the Python API (train/screen/api.py); it is imported on
first use, so `import train.metrics` and the CLI's start-up do not load it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Screener", "Screening"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from train.screen import api

        return getattr(api, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
