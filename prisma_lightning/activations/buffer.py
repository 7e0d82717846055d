"""`MixingBuffer`: a fixed-capacity token store that shuffles activations across many images.

Consecutive tokens of one image are highly correlated; an SAE trained on them in order sees a biased stream.
The buffer is filled from fresh batches and emptied by sampling rows uniformly at random without replacement,
so every batch mixes tokens of (capacity / tokens-per-image) images. Each token is returned exactly once.
"""

from __future__ import annotations

from typing import Any

import torch


class MixingBuffer:
    """Holds at most ``capacity`` rows of width ``d``; ``pop(n)`` returns ``n`` random rows and removes them.

    Memory is allocated once (``capacity x d``); popping moves rows from the end into the holes, so the
    occupied part stays contiguous. Seeded and checkpointable (``state_dict`` / ``load_state_dict``).
    """

    def __init__(
        self,
        capacity: int,
        d: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if capacity <= 0 or d <= 0:
            raise ValueError(f"MixingBuffer needs capacity > 0 and d > 0, got capacity={capacity}, d={d}.")
        self.capacity, self.d = int(capacity), int(d)
        self.data = torch.empty(self.capacity, self.d, dtype=dtype, device=device)
        self.size = 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def free(self) -> int:
        return self.capacity - self.size

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def add(self, rows: torch.Tensor) -> int:
        """Append up to ``free`` rows of ``rows [N, d]``; returns how many were taken (the caller keeps the rest)."""
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"MixingBuffer rows must be [N, {self.d}], got {tuple(rows.shape)}.")
        n = min(rows.shape[0], self.free)
        if n:
            self.data[self.size : self.size + n].copy_(rows[:n])
            self.size += n
        return n

    def pop(self, n: int) -> torch.Tensor:
        """Remove and return ``n`` rows chosen uniformly at random (a new tensor ``[n, d]``)."""
        if not 0 < n <= self.size:
            raise ValueError(f"Cannot pop {n} rows from a buffer holding {self.size}.")
        idx = torch.randperm(self.size, generator=self.generator)[:n].to(self.data.device)
        out = self.data[idx]
        # Fill the holes below the new size with the rows above it that were not taken.
        new_size = self.size - n
        taken = torch.zeros(self.size, dtype=torch.bool, device=self.data.device)
        taken[idx] = True
        holes = idx[idx < new_size]
        keep_tail = torch.arange(new_size, self.size, device=self.data.device)[~taken[new_size:]]
        if holes.numel():
            self.data[holes] = self.data[keep_tail]
        self.size = new_size
        return out

    def state_dict(self) -> dict[str, Any]:
        """The occupied rows (as stored), the size and the RNG state; restores to an identical buffer."""
        return {"data": self.data[: self.size].clone(), "size": self.size, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        if data.shape[0] > self.capacity or (data.ndim == 2 and data.shape[1] != self.d):
            raise ValueError(
                f"Buffer state of shape {tuple(data.shape)} does not fit this buffer (capacity {self.capacity}, "
                f"d {self.d}); resume with the same buffer_tokens and hook."
            )
        self.size = int(state["size"])
        self.data[: self.size].copy_(data)
        self.generator.set_state(state["rng"])
