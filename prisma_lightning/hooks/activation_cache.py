"""`ActivationCache`: the activations of one forward pass, with residual-stream decompositions.

Keys are full hook names (``blocks.3.hook_resid_post``); ``cache["resid_post", 3]`` and the other
TransformerLens shorthands resolve through :func:`act_name`, and a model's hook aliases (e.g. ViT-Prisma's
``hook_ln_final``) resolve to the canonical names they stand for. Decompositions need to know where the model's
residual stream lives; they ask the model the cache came from, through the
:class:`~prisma_lightning.hooks.protocol.ResidualStreamModel` members only (which hook holds the stream at each
layer, which hooks hold each component's write, which LayerNorm reads it), so nothing here depends on how a
model is built.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import torch

from prisma_lightning.hooks.protocol import ResidNorm, ResidualStreamModel

PosSlice = None | int | slice | list[int] | torch.Tensor

_BLOCK_HOOKS = {
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_in", "mlp_in", "q_input", "k_input", "v_input"
}  # fmt: skip
_ATTN_HOOKS = {"q", "k", "v", "z", "result", "attn_scores", "pattern"}
_ALIASES = {"attn": "pattern", "scores": "attn_scores", "mlp_pre": "pre", "mlp_post": "post"}
_MLP_HOOKS = {"pre", "post"}
_LN_HOOKS = {"normalized", "scale"}
_TOP_HOOKS = {"embed", "pos_embed", "full_embed", "pooled", "head_out"}


def act_name(name: str, layer: int | None = None, sublayer: str | None = None) -> str:
    """Full hook name from a shorthand: ``act_name("resid_post", 3) == "blocks.3.hook_resid_post"``.

    ``sublayer`` picks the LayerNorm for ``normalized``/``scale`` (``"ln1"``, ``"ln2"``; ``ln_final`` when
    ``layer`` is None). Names that already contain a dot or start with ``hook_`` are returned unchanged.
    """
    if "." in name or name.startswith("hook_"):
        return name
    name = _ALIASES.get(name, name)
    if name in _TOP_HOOKS:
        return f"hook_{name}"
    if name in _LN_HOOKS:
        if layer is None:
            return f"{sublayer or 'ln_final'}.hook_{name}"
        return f"blocks.{layer}.{sublayer or 'ln1'}.hook_{name}"
    if layer is None:
        raise KeyError(f"Shorthand {name!r} needs a layer index, e.g. cache[{name!r}, 0].")
    if name in _BLOCK_HOOKS:
        return f"blocks.{layer}.hook_{name}"
    if name in _ATTN_HOOKS:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in _MLP_HOOKS:
        return f"blocks.{layer}.mlp.hook_{name}"
    known = sorted(_BLOCK_HOOKS | _ATTN_HOOKS | _MLP_HOOKS | _LN_HOOKS | _TOP_HOOKS | set(_ALIASES))
    raise KeyError(f"Unknown hook shorthand {name!r}; known shorthands: {known}.")


def _slice_pos(x: torch.Tensor, pos_slice: PosSlice) -> torch.Tensor:
    """Select token positions on the second-to-last dimension (``[..., T, d]``)."""
    if pos_slice is None:
        return x
    return x[..., pos_slice, :]


class ActivationCache:
    """Mapping from hook names to cached tensors, plus the model that produced them.

    Args:
        cache_dict: canonical hook name -> activation (``<name>_grad`` for gradients).
        model: the model the activations came from; its ``canonical_hook_name`` resolves aliases, and the
            decompositions use its :class:`~prisma_lightning.hooks.protocol.ResidualStreamModel` members.
        has_batch_dim: whether every tensor starts with the batch dimension.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------------ mapping interface
    def _key(self, key: str | tuple) -> str:
        if isinstance(key, tuple):
            name = act_name(*key)
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, int) and layer < 0:
                name = act_name(key[0], self._n_layers + layer, *key[2:])
            return name
        if key in self.cache_dict:
            return key
        name = act_name(key)
        canonical = getattr(self.model, "canonical_hook_name", None)
        if canonical is None:
            return name
        if name.endswith("_grad"):  # the gradient entry of an alias: "hook_ln_final_grad"
            return canonical(name.removesuffix("_grad")) + "_grad"
        return canonical(name)

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            close = difflib.get_close_matches(name, list(self.cache_dict), n=5, cutoff=0.4)
            asked = f"{key!r} ({name!r})" if isinstance(key, str) and key != name else f"{name!r}"
            raise KeyError(
                f"{asked} is not in this cache ({len(self.cache_dict)} entries). Closest cached: {close}. "
                "Cache it with run_with_cache(..., names_filter=...) including that name."
            )
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        try:
            return self._key(key) in self.cache_dict  # type: ignore[arg-type]
        except KeyError:
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} entries: {list(self.cache_dict)[:6]}{'...' if len(self) > 6 else ''})"

    def to(self, device: str | torch.device, move_model: bool = False) -> ActivationCache:
        """Move every tensor (and optionally the model) to ``device``; returns self."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        if move_model:
            self.model.to(device)
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop a batch dimension of size 1 from every tensor; returns self."""
        if not self.has_batch_dim:
            return self
        for name, value in self.cache_dict.items():
            if value.ndim == 0 or value.shape[0] != 1:
                raise ValueError(
                    f"remove_batch_dim needs batch size 1, but {name!r} has shape {tuple(value.shape)}; "
                    "index one example first (e.g. run the model on images[:1])."
                )
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    # ------------------------------------------------------------------ residual stream
    @property
    def _stream(self) -> ResidualStreamModel:
        """The model as a :class:`ResidualStreamModel` (a ``TypeError`` saying what is missing otherwise)."""
        if not isinstance(self.model, ResidualStreamModel):
            missing = [m for m in ("cfg", "resid_hook_name", "resid_components", "resid_norm", "head_results")
                       if not hasattr(self.model, m)]  # fmt: skip
            raise TypeError(
                f"Residual-stream decompositions need a model that says where its residual stream lives; "
                f"{type(self.model).__name__} lacks {missing}. Implement "
                "prisma_lightning.hooks.protocol.ResidualStreamModel on it (HookedViT does)."
            )
        return self.model

    @property
    def _n_layers(self) -> int:
        n_layers = getattr(getattr(self.model, "cfg", None), "n_layers", None)
        if n_layers is None:
            return int(self._stream.cfg.n_layers)  # raises the TypeError naming what the model lacks
        return int(n_layers)

    def _layer(self, layer: int | None) -> int:
        n = self._n_layers
        if layer is None:
            return n
        if layer < 0:
            layer += n + 1
        if not 0 <= layer <= n:
            raise ValueError(f"layer must be in [0, {n}] (n_layers={n}), got {layer}.")
        return layer

    def _resid_at(self, layer: int, mlp_input: bool = False) -> torch.Tensor:
        """Residual stream entering block ``layer`` (its MLP if ``mlp_input``); ``n_layers`` = final."""
        return self[self._stream.resid_hook_name(layer, mlp_input)]

    def _norm_at(self, layer: int, mlp_input: bool) -> ResidNorm:
        norm = self._stream.resid_norm(layer, mlp_input)
        if norm is None:
            where = "final LayerNorm over all tokens" if layer == self._n_layers else f"LayerNorm at layer {layer}"
            raise ValueError(
                f"This model has no {where} reading the residual stream (e.g. it normalises after pooling, "
                "fc_norm), so applying it is undefined. Pass a block index instead."
            )
        return norm

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
        mlp_input: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Stack ``[n, (B,) T, d]`` of the residual stream before each block up to ``layer`` (None: the end).

        The last entry is the residual entering block ``layer`` (``final_post`` for None); with ``incl_mid``
        the mid-block residuals are interleaved. ``apply_ln`` normalises each entry with the LayerNorm that
        reads the residual at ``layer`` (``ln_final`` for None), using each entry's own statistics.
        """
        layer = self._layer(layer)
        stream = self._stream
        parts, labels = [], []
        for i in range(layer):
            parts.append(self[stream.resid_hook_name(i)])
            labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self[stream.resid_hook_name(i, mlp_input=True)])
                labels.append(f"{i}_mid")
        if mlp_input:
            parts.append(self._resid_at(layer))
            labels.append(f"{layer}_pre")
            parts.append(self._resid_at(layer, mlp_input=True))
            labels.append(f"{layer}_mid")
        else:
            parts.append(self._resid_at(layer))
            labels.append("final_post" if layer == self._n_layers else f"{layer}_pre")
        stack = torch.stack([_slice_pos(p, pos_slice) for p in parts])
        if apply_ln:
            # Each entry is a whole residual stream, so it gets the full LayerNorm with its own scale: the
            # logit lens then shows exactly what the model would output if it stopped there.
            ln = self._norm_at(layer, mlp_input)
            stack = torch.nn.functional.layer_norm(stack, (stack.shape[-1],), ln.weight, ln.bias, ln.eps)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Stack ``[n, (B,) T, d]`` of what each component wrote into the residual stream before ``layer``.

        Components (the model's ``resid_components``): ``embed`` (the residual entering block 0, i.e. after
        ``ln_pre`` where the model has one), then ``{i}_attn_out`` and ``{i}_mlp_out`` per block. They sum exactly
        to the residual at ``layer`` (entering its MLP when ``mlp_input``). ``mode`` is ``all``, ``attn`` or ``mlp``.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}.")
        layer = self._layer(layer)
        parts, labels = [], []
        for component in self._stream.resid_components(layer, mlp_input):
            keep = incl_embeds if component.kind == "embed" else mode in ("all", component.kind)
            if keep:
                parts.append(self[component.hook_name])
                labels.append(component.label)
        stack = torch.stack([_slice_pos(p, pos_slice) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self,
        layer: int | None = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Stack ``[n_heads*layer (+1), (B,) T, d]`` of every head's write to the residual stream.

        Each block's heads come from the model's ``head_results`` (for a HookedViT: ``attn.hook_result`` when
        cached, otherwise ``attn.hook_z`` times ``W_O``, layer scale included). ``incl_remainder`` appends
        residual minus all heads.
        """
        layer = self._layer(layer)
        if layer == 0:
            raise ValueError("stack_head_results needs layer >= 1 (there are no heads before block 0).")
        stream = self._stream
        parts, labels = [], []
        for i in range(layer):
            result = stream.head_results(i, self)  # [(B,) T, h, d]
            result = _slice_pos(result.movedim(-2, 0), pos_slice)  # [h, (B,) T, d]
            parts.append(result)
            labels += [f"L{i}H{h}" for h in range(result.shape[0])]
        stack = torch.cat(parts, dim=0)
        if incl_remainder:
            remainder = _slice_pos(self._resid_at(layer), pos_slice) - stack.sum(0)
            stack = torch.cat([stack, remainder[None]], dim=0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        include_bias: bool = True,
    ) -> torch.Tensor:
        """Apply the LayerNorm that reads the residual at ``layer`` to each component of a stack ``[n, ..., d]``.

        Each component is centred, divided by the scale of the *actual* residual at that point (from the
        cache), and multiplied by the LN weight. The LN bias is shared out equally (``include_bias``), so the
        components of a full decomposition still sum to the real LayerNorm output.
        """
        layer = self._layer(layer)
        ln = self._norm_at(layer, mlp_input)
        if ln.scale_hook is not None and ln.scale_hook in self.cache_dict:
            scale = _slice_pos(self.cache_dict[ln.scale_hook], pos_slice)
        else:
            resid = _slice_pos(self._resid_at(layer, mlp_input), pos_slice)
            centred = resid - resid.mean(-1, keepdim=True)
            scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        out = (residual_stack - residual_stack.mean(-1, keepdim=True)) / scale
        if ln.weight is not None:
            out = out * ln.weight.to(out.dtype)
        if include_bias and ln.bias is not None:
            out = out + ln.bias.to(out.dtype) / residual_stack.shape[0]
        return out
