"""Activation patching: copy an activation from one run into another and measure what it restores.

``denoise`` (default) runs the *corrupted* input and writes in activations cached on the *clean* input; ``noise``
does the reverse. Each patch is one hook point at one layer, the whole activation or one token position, one head,
or one head at one position. The result holds a metric (by default the clean-vs-corrupted logit difference) for
every patch, laid out layer x position, layer x head or layer x head x position.

Identities that hold for any model (the tests check them): patching clean activations into the clean run changes
nothing; patching the whole final residual stream reproduces the source run's output exactly. Several patches are
run as one batch (``batch_patches``), so a layer x position sweep costs ``L * T / batch_patches`` forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from prisma_lightning.hooks.activation_cache import act_name
from prisma_lightning.interp._common import as_batch, layout_for_tokens, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from prisma_lightning.backbones.protocol import HookedBackbone

Metric = Callable[[Tensor], Tensor]
"""Maps the model output ``[B, ...]`` to a scalar (a ``[B]`` result is averaged)."""
Granularity = Literal["all", "position", "head", "head_position"]
Direction = Literal["denoise", "noise"]

_HEAD_FIRST = ("hook_pattern", "hook_attn_scores")  # [B, h, T_q, T_k]
_HEAD_LAST = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")  # [B, T, h, dh]


class LogitDiff:
    """Mean over images of ``logits[b, correct_b] - logits[b, wrong_b]`` (a patching metric)."""

    def __init__(self, correct: Tensor, wrong: Tensor) -> None:
        self.correct, self.wrong = correct.long(), wrong.long()

    def __call__(self, logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        diff = logits[rows, self.correct.to(logits.device)] - logits[rows, self.wrong.to(logits.device)]
        return diff.float().mean()

    def __repr__(self) -> str:
        return f"LogitDiff(correct={self.correct.tolist()}, wrong={self.wrong.tolist()})"

    @classmethod
    def from_runs(cls, clean_logits: Tensor, corrupted_logits: Tensor) -> LogitDiff:
        """Correct = the clean prediction; wrong = the corrupted prediction, or the clean runner-up where they agree."""
        top2 = clean_logits.topk(2, dim=-1).indices
        correct, wrong = top2[:, 0], corrupted_logits.argmax(-1)
        same = wrong == correct
        wrong = torch.where(same, top2[:, 1], wrong)
        return cls(correct, wrong)


@dataclass(frozen=True)
class PatchingResult:
    """What :func:`activation_patching` returns."""

    values: Tensor
    """Metric after each patch: ``[L]`` (``all``), ``[L, P]`` (``position``), ``[L, H]`` (``head``) or
    ``[L, H, P]`` (``head_position``)."""
    baseline: float
    """Metric of the run that is patched into, unpatched (corrupted for ``denoise``)."""
    source: float
    """Metric of the run the activations come from (clean for ``denoise``)."""
    hook_names: list[str]
    """Hook patched for each row."""
    positions: list[int] | None
    """Token positions of the position axis (None without one)."""
    heads: list[int] | None
    """Heads of the head axis (None without one)."""
    by: Granularity
    direction: Direction

    @property
    def effect(self) -> Tensor:
        """``values - baseline``: what each patch changed."""
        return self.values - self.baseline

    def normalized(self) -> Tensor:
        """``(values - baseline) / (source - baseline)``: 0 = no effect, 1 = the source run's metric restored."""
        gap = self.source - self.baseline
        if abs(gap) < 1e-12:
            raise ValueError("The two runs have the same metric, so there is no gap to normalise by.")
        return self.effect / gap


def _resolve_hooks(model: HookedBackbone, hook: str, layers: Sequence[int] | None) -> list[str]:
    if "{layer}" in hook:
        names = [hook.format(layer=i) for i in (layers if layers is not None else range(model.cfg.n_layers))]
    elif "." in hook or hook.startswith("hook_"):  # a full hook name or an alias (act_name's rule), not a shorthand
        if layers is not None:
            raise ValueError(f"{hook!r} is a single hook; pass a shorthand ('resid_pre') or a template to use layers.")
        names = [hook]
    else:
        names = [act_name(hook, i) for i in (layers if layers is not None else range(model.cfg.n_layers))]
    model.resolve_hooks(names)  # KeyError with the closest valid names
    return names


def _axes(name: str, ndim: int, by: Granularity) -> tuple[int | None, int | None]:
    """(position dim, head dim) of a hook's activation for this granularity."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _HEAD_FIRST:
        pos_dim, head_dim = 2, 1
    elif leaf in _HEAD_LAST:
        pos_dim, head_dim = 1, 2
    else:
        pos_dim, head_dim = (1 if ndim >= 3 else None), None
    if by in ("head", "head_position") and head_dim is None:
        raise ValueError(f"by={by!r} needs a per-head hook (z, q, k, v, result, pattern, attn_scores), got {name!r}.")
    if by in ("position", "head_position") and pos_dim is None:
        raise ValueError(f"by={by!r} needs a per-token hook [B, T, ...]; {name!r} has {ndim} dimensions.")
    return pos_dim, head_dim


def _index(ndim: int, pos_dim: int | None, head_dim: int | None, pos: int | None, head: int | None) -> tuple:
    idx: list[Any] = [slice(None)] * ndim
    if pos is not None:
        idx[pos_dim] = pos
    if head is not None:
        idx[head_dim] = head
    return tuple(idx)


@torch.no_grad()
def activation_patching(
    model: HookedBackbone,
    clean: Tensor,
    corrupted: Tensor,
    hook: str = "resid_pre",
    by: Granularity = "position",
    metric: Metric | None = None,
    direction: Direction = "denoise",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch_patches: int = 16,
) -> PatchingResult:
    """Patch ``hook`` from one run into the other, one patch at a time, and record ``metric`` for each.

    Args:
        model: any HookedBackbone (images ``[B, C, H, W]`` or video ``[B, T, C, H, W]``).
        clean, corrupted: inputs of the same shape.
        hook: a shorthand (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``, ``z``, ``q``,
            ``k``, ``v``, ``pattern``, ``result``), a template with ``{layer}``, or one full hook name.
        by: ``all`` (the whole activation), ``position`` (one token), ``head`` (one head, all tokens) or
            ``head_position``. Positions of attention patterns are query positions.
        metric: model output -> scalar; default :class:`LogitDiff` of the clean vs the corrupted prediction.
        direction: ``denoise`` patches clean activations into the corrupted run, ``noise`` the reverse.
        layers, positions, heads: subsets to sweep (default: all).
        batch_patches: patched copies of the input run in one forward pass.
    """
    clean, corrupted = as_batch(model, clean), as_batch(model, corrupted)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have one shape.")
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    if by not in ("all", "position", "head", "head_position"):
        raise ValueError(f"by must be 'all', 'position', 'head' or 'head_position', got {by!r}.")
    if batch_patches < 1:
        raise ValueError(f"batch_patches must be >= 1, got {batch_patches}.")
    names = _resolve_hooks(model, hook, layers)
    clean_out, clean_cache = model.run_with_cache(clean, names_filter=names)
    corrupted_out, corrupted_cache = model.run_with_cache(corrupted, names_filter=names)
    if metric is None:
        metric = LogitDiff.from_runs(clean_out, corrupted_out)
    source_cache, target_input = (clean_cache, corrupted) if direction == "denoise" else (corrupted_cache, clean)
    source_out, target_out = (clean_out, corrupted_out) if direction == "denoise" else (corrupted_out, clean_out)

    first = source_cache[names[0]]
    pos_dim, head_dim = _axes(names[0], first.ndim, by)
    pos_list = list(positions) if positions is not None else (
        list(range(first.shape[pos_dim])) if by in ("position", "head_position") else None
    )  # fmt: skip
    head_list = list(heads) if heads is not None else (
        list(range(first.shape[head_dim])) if by in ("head", "head_position") else None
    )  # fmt: skip
    cells: list[tuple[int | None, int | None]] = [
        (h, p) for h in (head_list or [None]) for p in (pos_list or [None])
    ]  # fmt: skip
    B = target_input.shape[0]
    rows = []
    for name in names:
        src = source_cache[name]
        values = []
        for start in range(0, len(cells), batch_patches):
            chunk = cells[start : start + batch_patches]
            n = len(chunk)

            def patch(act: Tensor, hook: Any, chunk=chunk, n=n, src=src) -> Tensor:
                act = act.clone().view(n, B, *act.shape[1:])
                for i, (h, p) in enumerate(chunk):
                    idx = _index(src.ndim, pos_dim, head_dim, p, h)
                    act[i][idx] = src[idx].to(act.dtype)
                return act.view(n * B, *act.shape[2:])

            batch = target_input.repeat(n, *([1] * (target_input.ndim - 1)))
            out = model.run_with_hooks(batch, fwd_hooks=[(name, patch)])
            for i in range(n):
                values.append(float(metric(out[i * B : (i + 1) * B])))
        rows.append(values)
    shape = [len(names)] + ([len(head_list)] if head_list else []) + ([len(pos_list)] if pos_list else [])
    return PatchingResult(
        values=torch.tensor(rows, dtype=torch.float32).reshape(shape),
        baseline=float(metric(target_out)),
        source=float(metric(source_out)),
        hook_names=names,
        positions=pos_list,
        heads=head_list,
        by=by,
        direction=direction,
    )


def plot_patching(result: PatchingResult, model: HookedBackbone | None = None, normalize: bool = True) -> Figure:
    """Heatmap of a patching sweep; with ``model`` and ``by='position'`` also each layer's effect over the patches.

    ``normalize`` shows ``(patched - baseline) / (source - baseline)`` (1 = fully restored) when the runs differ.
    """
    try:
        values, label = (result.normalized(), "restored fraction") if normalize else (result.effect, "effect")
    except ValueError:
        values, label = result.effect, "effect"
    if values.ndim == 3:  # head_position: averaged over heads
        values = values.mean(1)
        label += " (mean over heads)"
    rows = [n.replace("blocks.", "L").replace(".hook_", " ") for n in result.hook_names]
    if values.ndim == 1:
        values = values[:, None]
    layout = None
    if model is not None and result.positions is not None:
        layout = layout_for_tokens(model, max(result.positions) + 1)
        if result.positions != list(range(layout.n_tokens)):
            layout = None  # a subset of positions has no image layout
    lim = float(values.abs().max()) or 1.0
    n_rows = values.shape[0]
    fig = new_figure(max(7.0, 2.2 * min(n_rows, 6)), 2.0 + 0.35 * n_rows + (2.6 if layout is not None else 0))
    if layout is not None:
        gs = fig.add_gridspec(2, n_rows, height_ratios=[1, 1.2])
        ax = fig.add_subplot(gs[0, :])
        for i in range(n_rows):
            sax = fig.add_subplot(gs[1, i])
            grid = layout.to_grid(values[i, layout.n_prefix :])[0]  # the first time step of a video model
            sax.imshow(grid.numpy(), cmap="RdBu", vmin=-lim, vmax=lim)
            sax.set_title(rows[i], fontsize=8)
            sax.set_xticks([])
            sax.set_yticks([])
    else:
        ax = fig.add_subplot()
    im = ax.imshow(values.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if result.by == "head":
        ax.set_xticks(range(values.shape[1]), [f"H{h}" for h in result.heads])
        ax.set_xlabel("head")
    elif result.positions is not None:
        ax.set_xlabel("token position")
    else:
        ax.set_xticks([])
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(f"Activation patching ({result.direction}, by {result.by})", fontsize=10)
    return fig
