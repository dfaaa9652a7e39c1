"""Measure what an autograd graph keeps alive: the peak bytes of tensors saved for backward.

Used to check memory claims that wall-clock figures cannot (DiffFlow's stochastic adjoint
holds one node's graph at a time; naive backprop holds all N): every tensor autograd saves
passes through :func:`torch.autograd.graph.saved_tensors_hooks`, distinct storages are
counted once while any saved reference to them lives, and parameters are left out.

Example:
    >>> net = torch.nn.Linear(4, 4)
    >>> with SavedTensorBytes(net.parameters()) as saved:
    ...     net(torch.randn(8, 4)).tanh().sum().backward()
    >>> saved.peak > 0 and saved.total == 0
    True
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

__all__ = ["SavedTensorBytes"]


class SavedTensorBytes:
    """Peak bytes of distinct tensor storages held for backward, ``exclude`` (parameters) left out.

    Use as a context manager around the forward pass (and the backward, to see the count
    fall back); ``peak`` is the high-water mark, ``total`` what is held now.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.total = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def pack(self, t: Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return t
        if ptr in self.live:
            self.live[ptr][0] += 1
        else:
            self.live[ptr] = [1, storage.nbytes()]
            self.total += storage.nbytes()
            self.peak = max(self.peak, self.total)
        return _Held(t, ptr, self)

    @staticmethod
    def unpack(held):
        return held if isinstance(held, Tensor) else held.tensor

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.total -= entry[1]
            del self.live[ptr]


class _Held:
    """A saved tensor whose release, when autograd drops it, is counted."""

    def __init__(self, tensor: Tensor, ptr: int, owner: SavedTensorBytes) -> None:
        self.tensor, self.ptr, self.owner = tensor, ptr, owner

    def __del__(self) -> None:
        self.owner.release(self.ptr)
