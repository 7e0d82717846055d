"""`TranscoderModule`: train transcoders from one hook to another (e.g. an MLP's input to its output).

Everything :class:`~prisma_lightning.modules.SAEModule` does (many transcoders per run, sweeps, online and cached
mode), with transcoder configs: each reads ``hook_name`` and reconstructs ``hook_name_out``. Online, both hooks come
from one backbone pass and the mixing buffer stores input and target side by side so they stay paired. Cached, the
data module yields ``(x, y)`` pairs (``ActivationDataModule(path=..., path_out=...)``) or ``{hook: rows}``.
"""

from __future__ import annotations

from typing import Any

from prisma_lightning.modules.sae_module import SAEModule, TranscoderConfigs
from prisma_lightning.sae import SparseAutoencoder


class TranscoderModule(SAEModule):
    """Like :class:`SAEModule`, with input rows from ``hook_name`` and targets from ``hook_name_out``.

    Typical pair: ``blocks.5.ln2.hook_normalized`` -> ``blocks.5.hook_mlp_out``.

    Args:
        sae: the transcoder config (template), a trained transcoder's folder, or a Transcoder object.
        hook_name_out: sets ``hook_name_out`` of every new transcoder.
        **kwargs: everything :class:`SAEModule` takes.
    """

    transcoders = True

    def __init__(
        self, sae: TranscoderConfigs | str | SparseAutoencoder | None = None, hook_name_out: str | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        object.__setattr__(self, "_hook_name_out", hook_name_out)
        super().__init__(sae, **kwargs)
        for name, transcoder in self.saes.items():
            if not transcoder.is_transcoder:
                raise TypeError(f"TranscoderModule needs transcoders; {name!r} is a {type(transcoder).__name__}.")
            if not transcoder.cfg.hook_name_out:
                raise ValueError(
                    f"Transcoder {name!r} needs hook_name_out (the target hook), e.g. 'blocks.5.hook_mlp_out'."
                )

    def expand(self, sae, saes, hooks, sweep, hook_name, tokens, l1_warmup_steps):  # type: ignore[override]
        specs, single = super().expand(sae, saes, hooks, sweep, hook_name, tokens, l1_warmup_steps)
        if self._hook_name_out:
            for spec in specs:
                if spec.config is not None:
                    spec.config.hook_name_out = self._hook_name_out
        return specs, single


__all__ = ["TranscoderModule"]
