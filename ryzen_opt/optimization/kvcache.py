"""``StaticKVCache``: a KV cache in preallocated buffers that reads like the tuple cache.

The baseline's cache is a tuple of ``(k, v)`` per layer that grows by ``torch.cat`` every
step. The model-level fast paths write each new position into a buffer sized for the whole
context instead (a fused step on the CPU, a CUDA graph on the GPU, both need fixed
addresses). A :class:`StaticKVCache` is a *view* ``(buffer, length)``: indexing it gives
the same ``(k, v)`` tensors, of ``length`` positions, that the tuple cache would hold, so the
model's ordinary ``forward`` accepts it too.

Caches stay values: a step from a view writes position ``length`` of its buffer only when no
other live view of that buffer is longer (which would see the write). Otherwise the step
first copies the view into a fresh buffer, so branching generations (two continuations of
one prompt) never corrupt each other.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch


class KVBuffer:
    """``k`` and ``v`` of shape ``(layers, batch, heads, max_len, head_dim)``, zero-filled.

    Zero fill matters on the GPU path: it attends over the whole buffer under a mask, and a
    masked NaN left in uninitialised memory would still poison ``P @ V``.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Weak references to the live views (a plain list: WeakSet costs microseconds per
        # add and per scan, which a per-token path pays every step).
        self._views: list[weakref.ref] = []
        # numpy views for the fused CPU step (float32 on the CPU only), made once.
        cpu_f32 = self.k.device.type == "cpu" and dtype == torch.float32
        self.arrays = (self.k.numpy(), self.v.numpy()) if cpu_f32 else None

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def view(self, length: int) -> StaticKVCache:
        """A cache view of the first ``length`` positions."""
        return StaticKVCache(self, length)

    def load(self, cache, length: int) -> None:
        """Copy the first ``length`` positions of a tuple-like cache into this buffer."""
        for i in range(self.k.shape[0]):
            k, v = cache[i]
            self.k[i, :, :, :length].copy_(k)
            self.v[i, :, :, :length].copy_(v)

    def add_view(self, view: StaticKVCache) -> None:
        self._views.append(weakref.ref(view))

    def has_view_longer_than(self, length: int) -> bool:
        longer = dead = False
        for r in self._views:
            v = r()
            if v is None:
                dead = True
            elif v.length > length:
                longer = True
        if dead:
            self._views = [r for r in self._views if r() is not None]
        return longer


class StaticKVCache:
    """A view of the first ``length`` positions of a :class:`KVBuffer`.

    Behaves like the baseline's tuple cache: ``len(cache)`` layers, ``cache[i]`` is
    ``(k, v)`` of shape ``(batch, heads, length, head_dim)`` (views of the buffer).

    Example:
        >>> import torch
        >>> from ryzen_opt.optimization.kvcache import StaticKVCache
        >>> tup = ((torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)),)
        >>> c = StaticKVCache.from_cache(tup, max_len=8)
        >>> c[0][0].shape, torch.equal(c[0][1], tup[0][1])
        (torch.Size([1, 2, 3, 4]), True)
    """

    __slots__ = ("buffer", "length", "__weakref__")

    def __init__(self, buffer: KVBuffer, length: int) -> None:
        if not 0 <= length <= buffer.max_len:
            raise ValueError(f"length must lie in [0, {buffer.max_len}], got {length}")
        self.buffer = buffer
        self.length = length
        buffer.add_view(self)

    @classmethod
    def from_cache(cls, cache, max_len: int, buffer: KVBuffer | None = None) -> StaticKVCache:
        """Copy a tuple-like cache into ``buffer`` (a new one of ``max_len`` when ``None``)."""
        k0 = cache[0][0]
        length = k0.shape[2]
        if length > max_len:
            raise ValueError(f"cache holds {length} positions, more than max_len={max_len}")
        if buffer is None:
            b, h, _, d = k0.shape
            buffer = KVBuffer(len(cache), b, h, max_len, d, k0.device, k0.dtype)
        buffer.load(cache, length)
        return cls(buffer, length)

    def __len__(self) -> int:
        return self.buffer.k.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.to_tuple()[i]
        n = self.length
        return self.buffer.k[i, :, :, :n], self.buffer.v[i, :, :, :n]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.to_tuple())

    def to_tuple(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The tuple cache (views of the buffer; ``clone`` them to keep past later steps)."""
        return tuple(self[i] for i in range(len(self)))

    @property
    def batch(self) -> int:
        return self.buffer.k.shape[1]

    def writable(self) -> bool:
        """Whether position ``length`` can be written without changing another live view."""
        return self.length < self.buffer.max_len and not self.buffer.has_view_longer_than(
            self.length
        )

    def advanced(self) -> StaticKVCache:
        """The view one position longer (after a step wrote position ``length``)."""
        return StaticKVCache(self.buffer, self.length + 1)

    def __repr__(self) -> str:
        k = self.buffer.k
        return (
            f"StaticKVCache(layers={k.shape[0]}, batch={k.shape[1]}, heads={k.shape[2]}, "
            f"length={self.length}, max_len={k.shape[3]}, device={k.device})"
        )
