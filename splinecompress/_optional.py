"""Optional dependencies, imported when a feature needs them, with an install hint when they are missing."""

from __future__ import annotations

from types import ModuleType

from splinecompress.errors import UsageError

__all__ = ["require_torch"]


def require_torch(feature: str) -> ModuleType:
    """Import torch for ``feature`` ("export", "fine-tuning", ...), or say how to install it.

    Raises:
        UsageError: torch is not installed.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(f"{feature} needs PyTorch: install it with  pip install 'splinecompress[torch]'") from e
    return torch
