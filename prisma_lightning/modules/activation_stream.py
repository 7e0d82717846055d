"""Online SAE training data: image batches in, one SAE step's rows per Lightning batch out.

In online mode the frozen backbone turns each image batch into many token rows -- often several SAE steps' worth
(a batch of 256 ViT-B/16 images is 50,432 tokens). If Lightning's batches were image batches, one batch would hold
several optimizer steps, and everything Lightning counts per batch would be off: ``every_n_train_steps``
checkpoints land at the wrong steps, the progress bar counts image batches, logs see one step in several.

:class:`ActivationStream` is therefore the training "dataloader" Lightning iterates in online mode: it pulls image
batches from the data module's own train loader, runs the backbone once per image batch (``SAEModule.fill``: every
requested hook in one pass, into one :class:`~prisma_lightning.activations.MixingBuffer` per hook group), and yields
one SAE step at a time (``{group: rows}``) whenever every buffer is ready. One Lightning batch = one SAE step =
one optimizer step.

Its length is the run's ``max_steps`` (or, without one, an estimate of one image epoch's steps), so Lightning
neither prefetches (a known length needs no look-ahead) nor ends early; image epochs roll over inside it. Its
state (``state_dict``) is the image loader's position -- exact when that loader is resumable (the project's data
modules are), otherwise the number of image batches to replay -- and the module checkpoints the buffers at the
same moment, so a resumed run continues bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any


def _is_stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _sampler_of(loader: Any) -> Any:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None and hasattr(batch_sampler, "sampler"):
        sampler = batch_sampler.sampler if not hasattr(sampler, "set_epoch") else sampler
    return sampler


class ActivationStream:
    """Lightning's training iterable in online mode (see the module docstring).

    Args:
        module: the ``SAEModule`` (``fill(batch)``, ``absorb()``, ``ready()``, ``pop_step()``, ``drop_blocked()``).
        make_loader: returns the image DataLoader (called once).
        length: batches (SAE steps) Lightning takes from one pass over this stream.
    """

    def __init__(self, module: Any, make_loader: Callable[[], Any], length: int) -> None:
        self.module = module
        self._make_loader = make_loader
        self._loader: Any = None
        self.length = max(1, int(length))
        self.image_epoch = 0
        self.batches_in_epoch = 0
        self._pending_state: dict[str, Any] | None = None
        self._generator: Iterator[Any] | None = None

    @property
    def loader(self) -> Any:
        if self._loader is None:
            self._loader = self._make_loader()
        return self._loader

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        if self._generator is None:
            self._generator = self._steps()
        for _ in range(self.length):
            yield next(self._generator)

    def _epoch_batches(self) -> Iterator[Any]:
        """The image batches of the current image epoch (resuming mid-epoch after ``load_state_dict``)."""
        loader = self.loader
        state, self._pending_state = self._pending_state, None
        skip = 0
        if state is not None:
            self.image_epoch = int(state.get("image_epoch", 0))
            if _is_stateful(loader) and state.get("loader") is not None:
                loader.load_state_dict(state["loader"])
            else:
                skip = int(state.get("batches_in_epoch", 0))
        if not _is_stateful(loader):
            sampler = _sampler_of(loader)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.image_epoch)
        self.batches_in_epoch = 0
        for i, batch in enumerate(loader):
            if i < skip:
                self.batches_in_epoch += 1
                continue  # a loader that cannot resume by itself: replay its order up to the saved position
            self.batches_in_epoch += 1
            yield batch

    def _drain(self) -> Iterator[Any]:
        """SAE steps from what the buffers (and the pending rows) hold, until a buffer needs more rows."""
        while True:
            self.module.absorb()
            if not self.module.ready():
                self.module.drop_blocked()
                return
            yield self.module.pop_step()

    def _steps(self) -> Iterator[Any]:
        # A resumed run first takes the steps its restored buffers hold, exactly as the interrupted run would have
        # before it fetched the next image batch.
        yield from self._drain()
        empty_epochs = 0
        while True:
            produced = False
            for batch in self._epoch_batches():
                produced = True
                self.module.fill(batch)
                yield from self._drain()
            self.image_epoch += 1
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise RuntimeError(
                    "The training data loader yields no batches: check the data module's training split "
                    "(subset sizes, fractions, an empty folder)."
                )

    def state_dict(self) -> dict[str, Any]:
        """Where the image stream stands (called by Lightning when it checkpoints)."""
        state: dict[str, Any] = {"image_epoch": self.image_epoch, "batches_in_epoch": self.batches_in_epoch}
        if self._loader is not None and _is_stateful(self._loader):
            state["loader"] = self._loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (Lightning calls this when it resumes from a checkpoint)."""
        self._pending_state = dict(state)
        self._generator = None


def steps_per_image_epoch(loader: Any, rows_per_image: int, batch_tokens: int) -> int:
    """About how many SAE steps one pass over ``loader`` gives (for a run that sets ``max_epochs``)."""
    try:
        n_batches = len(loader)
    except TypeError:
        return 1
    batch_size = getattr(loader, "batch_size", None) or 1
    return max(1, math.floor(n_batches * batch_size * rows_per_image / batch_tokens))


__all__ = ["ActivationStream", "steps_per_image_epoch"]
