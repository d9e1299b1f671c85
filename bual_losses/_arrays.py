"""NumPy <-> torch conversion for the non-differentiable helpers.

Uncertainty maps, masks and diagnostics accept either a ``numpy.ndarray`` or a
``torch.Tensor``; numpy in gives numpy out, torch in gives torch out on the same device.
The conversion lives here so every such helper behaves the same way.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar, Union

import numpy as np
import torch

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["ArrayLike", "as_tensor", "numpy_compatible", "restore"]

ArrayLike = Union[torch.Tensor, np.ndarray]
"""What the non-differentiable helpers accept and return."""


def as_tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    """Return ``(tensor, was_numpy)``; numpy arrays share memory with the tensor (no copy)."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        if x.dtype == np.float16 or x.dtype.kind in "fiub":
            return torch.from_numpy(np.ascontiguousarray(x)), True
        raise TypeError(f"`{name}` must have a numeric dtype, got numpy dtype {x.dtype}.")
    raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")


def restore(x: Any, was_numpy: bool) -> Any:
    """Turn torch results back into numpy when the caller passed numpy (recursing into tuples)."""
    if not was_numpy:
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # NamedTuple
        return type(x)(*(restore(v, True) for v in x))
    if isinstance(x, tuple):
        return tuple(restore(v, True) for v in x)
    return x


def numpy_compatible(*array_args: str) -> Callable[[F], F]:
    """Decorator: convert the named arguments from numpy to torch and the result back.

    The result is numpy when the *first* named argument arrived as numpy. Other named arguments
    may be either type; a numpy one is moved to the device of the first.
    """

    def decorate(fn: F) -> F:
        import inspect

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            first_numpy: bool | None = None
            device: torch.device | None = None
            for name in array_args:
                if name not in bound.arguments or bound.arguments[name] is None:
                    continue
                value = bound.arguments[name]
                if not isinstance(value, (torch.Tensor, np.ndarray)):
                    continue
                tensor, was_numpy = as_tensor(value, name)
                if first_numpy is None:
                    first_numpy, device = was_numpy, tensor.device
                elif was_numpy and device is not None:
                    tensor = tensor.to(device)
                bound.arguments[name] = tensor
            return restore(fn(*bound.args, **bound.kwargs), bool(first_numpy))

        return wrapper  # type: ignore[return-value]

    return decorate
