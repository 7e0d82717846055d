"""`ActivationCache`: the activations of one forward pass, with residual-stream decompositions.

Keys are full hook names (``blocks.3.hook_resid_post``); ``cache["resid_post", 3]`` and the other
TransformerLens shorthands resolve through :func:`act_name`. Decompositions need the model the cache came
from (its depth and its LayerNorms), which the cache keeps a reference to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from prisma_lightning.hooks.hooked_module import HookedModule

PosSlice = None | int | slice | list[int] | torch.Tensor

_BLOCK_HOOKS = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
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
    """Mapping from hook names to cached tensors, plus the model that produced them."""

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: HookedModule, has_batch_dim: bool = True):
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
        return act_name(key)

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            import difflib

            close = difflib.get_close_matches(name, list(self.cache_dict), n=5, cutoff=0.4)
            raise KeyError(
                f"{name!r} is not in this cache ({len(self.cache_dict)} entries). Closest cached: {close}. "
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
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers

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
        if mlp_input:
            return self[f"blocks.{layer}.hook_resid_mid"]
        if layer == self._n_layers:
            return self[f"blocks.{layer - 1}.hook_resid_post"]
        return self[f"blocks.{layer}.hook_resid_pre"]

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
        parts, labels = [], []
        for i in range(layer):
            parts.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        if mlp_input:
            parts.append(self[f"blocks.{layer}.hook_resid_pre"])
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
            ln = self._ln_at(layer, mlp_input)
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

        Components: ``embed`` (the residual entering block 0, i.e. after ``ln_pre`` where the model has one),
        then ``{i}_attn_out`` and ``{i}_mlp_out`` per block. They sum exactly to the residual at ``layer``
        (entering its MLP when ``mlp_input``). ``mode`` is ``all``, ``attn`` or ``mlp``.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}.")
        layer = self._layer(layer)
        attn_only = getattr(self.model.cfg, "attn_only", False)
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["blocks.0.hook_resid_pre"])
            labels.append("embed")
        for i in range(layer + (1 if mlp_input else 0)):
            if mode in ("all", "attn"):
                parts.append(self[f"blocks.{i}.hook_attn_out"])
                labels.append(f"{i}_attn_out")
            if mode in ("all", "mlp") and not attn_only and i < layer:
                parts.append(self[f"blocks.{i}.hook_mlp_out"])
                labels.append(f"{i}_mlp_out")
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

        Uses ``attn.hook_result`` when cached, otherwise computes it from ``attn.hook_z`` and the model's
        ``W_O`` (which includes any layer scale). ``incl_remainder`` appends residual minus all heads.
        """
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            name = f"blocks.{i}.attn.hook_result"
            if name in self.cache_dict:
                result = self.cache_dict[name]
            else:
                z = self[f"blocks.{i}.attn.hook_z"]  # [(B,) T, h, dh]
                w_o = self.model.W_O[i].to(z.device, z.dtype)  # [h, dh, d]
                result = torch.einsum("...thd,hdm->...thm", z, w_o)
            result = _slice_pos(result.movedim(-2, 0), pos_slice)  # [h, (B,) T, d]
            parts.append(result)
            labels += [f"L{i}H{h}" for h in range(result.shape[0])]
        if not parts:
            raise ValueError("stack_head_results needs layer >= 1 (there are no heads before block 0).")
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
        ln = self._ln_at(layer, mlp_input)
        resid = _slice_pos(self._resid_at(layer, mlp_input), pos_slice)
        scale_name = f"{self._ln_name(layer, mlp_input)}.hook_scale"
        if scale_name in self.cache_dict:
            scale = _slice_pos(self.cache_dict[scale_name], pos_slice)
        else:
            centred = resid - resid.mean(-1, keepdim=True)
            scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        out = (residual_stack - residual_stack.mean(-1, keepdim=True)) / scale
        if ln.weight is not None:
            out = out * ln.weight.to(out.dtype)
        if include_bias and ln.bias is not None:
            out = out + ln.bias.to(out.dtype) / residual_stack.shape[0]
        return out

    def _ln_name(self, layer: int, mlp_input: bool) -> str:
        if layer == self._n_layers:
            return "ln_final"
        return f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}"

    def _ln_at(self, layer: int, mlp_input: bool) -> Any:
        if layer == self._n_layers:
            ln = getattr(self.model, "ln_final", None)
            if ln is None or not hasattr(ln, "eps"):
                raise ValueError(
                    "This model has no final LayerNorm over all tokens (it normalises after pooling, fc_norm); "
                    "apply_ln_to_stack at the final layer is undefined. Pass a block index instead."
                )
            return ln
        block = self.model.blocks[layer]
        return block.ln2 if mlp_input else block.ln1
