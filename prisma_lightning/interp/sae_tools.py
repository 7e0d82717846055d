"""SAEs inside the model: splice reconstructions in, steer with a feature, find each feature's top images.

* :func:`splice_saes` (``with splice_saes(model, [sae]): ...``): a context manager that replaces the activation at
  each SAE's ``cfg.hook_name`` by its reconstruction, at the token positions the SAE was trained on (``cfg.tokens``).
  Transcoders read ``hook_name`` and replace ``hook_name_out``. ``include_error=True`` adds the reconstruction
  error back as a constant, so outputs are unchanged while gradients flow through the SAE's features.
* :func:`feature_steering`: forward hooks that add ``scale`` times a feature's decoder direction (or clamp the
  feature to ``scale``) at the SAE's hook.
* :func:`top_activating`: the ``k`` images of a data module on which each feature fires most, with the feature's
  activation on every patch; :func:`plot_top_activating` draws them as an image grid.

Activations of per-head hooks (``hook_z [B, T, h, dh]``) are flattened to ``h * dh`` when that is the SAE's width.
Everything here needs only the :class:`~prisma_lightning.backbones.protocol.HookedBackbone` interface (hooks,
``cfg.class_token``, ``cfg.n_prefix_tokens``, ``stop_layer_for``), so it works on any backbone that provides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from prisma_lightning.interp._common import (
    TokenLayout,
    display_image,
    new_figure,
    token_layout,
    upsample_grid,
)
from prisma_lightning.utils import save_figure_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from prisma_lightning.backbones.protocol import HookedBackbone

HookSpec = tuple[str, Callable[..., Any]]


# ---------------------------------------------------------------------------------------------- shared helpers
def _hooks_of(sae: nn.Module, model: HookedBackbone) -> tuple[str, str]:
    """(input hook, output hook) of an SAE (the same hook) or a transcoder."""
    cfg = getattr(sae, "cfg", None)
    hook_in = getattr(cfg, "hook_name", "")
    if not hook_in:
        raise ValueError(
            f"{type(sae).__name__}.cfg.hook_name is empty; set it to the hook the SAE was trained on "
            "(e.g. 'blocks.1.hook_resid_post') so it can be spliced into the model."
        )
    hook_out = getattr(cfg, "hook_name_out", None) or hook_in
    model.resolve_hooks([hook_in, hook_out])  # KeyError naming the closest valid hooks
    return hook_in, hook_out


def _positions(sae: nn.Module, model: HookedBackbone) -> slice:
    tokens = getattr(sae.cfg, "tokens", "all")
    if tokens == "cls":
        if not model.cfg.class_token:
            raise ValueError("This SAE was trained on the class token (tokens='cls'), but the model has none.")
        return slice(0, 1)
    if tokens == "patches":
        return slice(model.cfg.n_prefix_tokens, None)
    return slice(None)


def _flat(act: Tensor, width: int, hook: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``act [..., d]`` (or per-head ``[..., h, dh]`` with ``h*dh == width``) -> ``[..., width]`` and the inverse."""
    if act.shape[-1] == width:
        return act, lambda y: y
    if act.ndim >= 2 and act.shape[-2] * act.shape[-1] == width:
        shape = act.shape
        return act.flatten(-2), lambda y: y.reshape(shape)
    raise ValueError(
        f"The SAE reads {width}-wide activations, but {hook!r} has shape {tuple(act.shape)}; check cfg.hook_name "
        "and that the SAE belongs to this model."
    )


def _select(act: Tensor, positions: slice) -> Tensor:
    """Token positions of a per-token activation ``[B, T, ...]``; pooled ``[B, d]`` hooks are used whole."""
    return act[:, positions] if act.ndim >= 3 else act


def _reconstruct(sae: nn.Module, x: Tensor) -> Tensor:
    feats = sae.encode(x)
    if hasattr(sae.cfg, "skip_connection"):  # a transcoder: its skip path reads the input
        return sae.decode(feats, x_in=x)
    return sae.decode(feats)


def _rewrite_hooks(
    sae: nn.Module, hook_in: str, hook_out: str, positions: slice, rewrite: Callable[[Tensor, Tensor], Tensor]
) -> list[HookSpec]:
    """Hooks that read the SAE's input rows ``x_in`` at ``hook_in`` and replace its output rows ``y`` at
    ``hook_out`` (only at ``positions``) by ``rewrite(x_in, y)``; a transcoder's input is captured first."""

    def read(act: Tensor) -> Tensor:
        return _flat(_select(act, positions), sae.d_in, hook_in)[0]

    def write(act: Tensor, x_in: Tensor) -> Tensor:
        y, unflat = _flat(_select(act, positions), sae.d_out, hook_out)
        new = unflat(rewrite(x_in, y).to(act.dtype))
        if act.ndim < 3:  # a pooled [B, d] hook is replaced whole
            return new
        out = act.clone()
        out[:, positions] = new
        return out

    if hook_in == hook_out:

        def read_and_write(act: Tensor, hook: Any) -> Tensor:
            return write(act, read(act))

        return [(hook_in, read_and_write)]
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        captured["x"] = read(act)

    def write_out(act: Tensor, hook: Any) -> Tensor:
        if "x" not in captured:
            raise RuntimeError(f"Transcoder input {hook_in!r} did not run before its output hook {hook_out!r}.")
        return write(act, captured.pop("x"))

    return [(hook_in, capture), (hook_out, write_out)]


# ---------------------------------------------------------------------------------------------- splicing
def splice_hooks(model: HookedBackbone, sae: nn.Module, include_error: bool = False) -> list[HookSpec]:
    """The forward hooks :func:`splice_saes` adds for one SAE or transcoder (usable with ``run_with_hooks``)."""
    hook_in, hook_out = _hooks_of(sae, model)

    def reconstruct(x_in: Tensor, y: Tensor) -> Tensor:
        recon = _reconstruct(sae, x_in).to(y.dtype)
        return recon + (y - recon).detach() if include_error else recon

    return _rewrite_hooks(sae, hook_in, hook_out, _positions(sae, model), reconstruct)


@contextmanager
def splice_saes(
    model: HookedBackbone, saes: nn.Module | Sequence[nn.Module], include_error: bool = False
) -> Iterator[HookedBackbone]:
    """Within the context, ``model``'s forward pass runs with each SAE's reconstruction in place of its activation.

    ``with splice_saes(model, [sae]): logits = model(images)``. SAEs apply in the order given (a later SAE on the same
    hook reads the earlier one's output). ``include_error=True`` adds ``activation - reconstruction`` back as a
    constant: outputs equal the plain model's (up to float rounding) and gradients still pass through the SAE.
    The SAEs run in their current train/eval mode (call ``sae.eval()`` for inference thresholds).
    """
    saes = [saes] if isinstance(saes, nn.Module) else list(saes)
    hooks: list[HookSpec] = []
    for sae in saes:
        hooks += splice_hooks(model, sae, include_error=include_error)
    with model.hooks(fwd_hooks=hooks):
        yield model


# ---------------------------------------------------------------------------------------------- steering
def feature_steering(
    sae: nn.Module,
    feature: int | Sequence[int],
    scale: float | Sequence[float],
    mode: Literal["add", "clamp"] = "add",
    model: HookedBackbone | None = None,
) -> list[HookSpec]:
    """Forward hooks that steer the model with SAE features; pass them as ``fwd_hooks=`` (or to ``model.hooks``).

    ``add``: the activation gets ``scale`` times the feature's decoder direction (in the raw activation space,
    i.e. ``decode(f + scale e_i) - decode(f)``). ``clamp``: the feature is set to ``scale`` and the difference in
    reconstruction is added, keeping the SAE's error. Only the SAE's token positions (``cfg.tokens``) change;
    pass ``model`` to resolve ``tokens='patches'`` (its prefix length) and to check the hook name.
    """
    features = [feature] if isinstance(feature, int) else list(feature)
    scales = [float(scale)] * len(features) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(features):
        raise ValueError(f"Got {len(scales)} scales for {len(features)} features; pass one scale or one per feature.")
    if mode not in ("add", "clamp"):
        raise ValueError(f"mode must be 'add' or 'clamp', got {mode!r}.")
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        raise ValueError(f"Features {bad} are outside [0, {sae.d_sae}).")
    hook_in = sae.cfg.hook_name
    hook_out = getattr(sae.cfg, "hook_name_out", None) or hook_in
    if model is not None:
        _hooks_of(sae, model)
        positions = _positions(sae, model)
    else:
        tokens = getattr(sae.cfg, "tokens", "all")
        if tokens == "patches":
            raise ValueError("tokens='patches' needs the model to know its prefix length: pass model=.")
        positions = slice(0, 1) if tokens == "cls" else slice(None)
    idx = torch.tensor(features)

    def steer(x_in: Tensor, y: Tensor) -> Tensor:
        feats = sae.encode(x_in)
        new = feats.clone()
        values = torch.tensor(scales, dtype=feats.dtype, device=feats.device)
        i = idx.to(feats.device)
        new[..., i] = feats[..., i] + values if mode == "add" else values.expand_as(new[..., i])
        if hasattr(sae.cfg, "skip_connection"):
            delta = sae.decode(new, x_in=x_in) - sae.decode(feats, x_in=x_in)
        else:
            delta = sae.decode(new) - sae.decode(feats)
        return y + delta.to(y.dtype)

    return _rewrite_hooks(sae, hook_in, hook_out, positions, steer)


# ---------------------------------------------------------------------------------------------- top images
@dataclass(frozen=True)
class TopActivating:
    """What :func:`top_activating` returns (features in the order asked; images best first)."""

    features: list[int]
    values: Tensor
    """``[F, k]`` each image's score: the feature's activation on the class token (``tokens='cls'``) or its
    maximum over the SAE's tokens."""
    indices: Tensor
    """``[F, k]`` index of each image in the order the loader yielded them."""
    images: Tensor
    """``[F, k, C, H, W]`` (clips ``[F, k, T, C, H, W]``) the images themselves (CPU)."""
    heatmaps: Tensor
    """``[F, k, n_time, gh, gw]`` the feature's activation on every patch of each image."""
    layout: TokenLayout
    n_images: int
    """Images scanned."""


def _batches(datamodule: Any, split: str) -> Iterable[Any]:
    loader_fn = getattr(datamodule, f"{split}_dataloader", None)
    if loader_fn is None:
        if isinstance(datamodule, Iterable):
            return datamodule
        raise TypeError(f"{type(datamodule).__name__} has no {split}_dataloader(); pass a LightningDataModule.")
    split_set = getattr(datamodule, f"{split}_set", "unknown")
    if split_set is None:
        datamodule.prepare_data()
        datamodule.setup("validate" if split in ("val", "predict") else "fit" if split == "train" else split)
    return loader_fn()


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("images", "pixel_values", "image", "video"):
            if key in batch:
                return batch[key]
    raise TypeError(f"Cannot find images in a batch of type {type(batch).__name__}; yield (images, labels).")


@torch.no_grad()
def _feature_acts(sae: nn.Module, acts: Tensor, features: Tensor, chunk: int = 4096) -> Tensor:
    """``[B, T, d]`` -> ``[B, T, F]`` activations of the chosen features, encoding ``chunk`` tokens at a time."""
    rows = acts.reshape(-1, acts.shape[-1])
    out = [sae.encode(rows[i : i + chunk])[:, features] for i in range(0, rows.shape[0], chunk)]
    return torch.cat(out).reshape(*acts.shape[:-1], len(features))


@torch.no_grad()
def top_activating(
    sae: nn.Module,
    model: HookedBackbone,
    datamodule: Any,
    features: Sequence[int],
    k: int = 9,
    split: Literal["train", "val", "test", "predict"] = "val",
    max_batches: int | None = None,
) -> TopActivating:
    """The ``k`` images of ``datamodule``'s ``split`` on which each feature activates most, with patch heatmaps.

    ``datamodule`` is a LightningDataModule (set up here if needed) or any iterable of batches ``(images, ...)``.
    Every patch token is encoded for the heatmaps, also for SAEs trained on the class token only.
    """
    features = [int(f) for f in features]
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        raise ValueError(f"Features {bad} are outside [0, {sae.d_sae}).")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    hook_in, _ = _hooks_of(sae, model)
    layout = token_layout(model)
    param = next(model.parameters())
    feat_idx = torch.tensor(features, device=param.device)
    tokens = getattr(sae.cfg, "tokens", "all")
    F_ = len(features)
    best_vals = torch.full((F_, 0), float("-inf"))
    best_idx = torch.zeros((F_, 0), dtype=torch.long)
    best_imgs: Tensor | None = None
    best_maps: Tensor | None = None
    seen = 0
    for b, batch in enumerate(_batches(datamodule, split)):
        if max_batches is not None and b >= max_batches:
            break
        images = _images_of(batch).to(device=param.device, dtype=param.dtype)
        _, cache = model.run_with_cache(images, names_filter=hook_in, stop_at_layer=model.stop_layer_for(hook_in))
        acts, _ = _flat(cache[hook_in], sae.d_in, hook_in)
        if acts.ndim != 3:
            raise ValueError(f"top_activating needs a per-token hook [B, T, d]; {hook_in!r} is {tuple(acts.shape)}.")
        fa = _feature_acts(sae, acts, feat_idx).float()  # [B, T, F]
        if tokens == "cls":
            scores = fa[:, 0]
        elif tokens == "patches":
            scores = fa[:, layout.n_prefix :].amax(1)
        else:
            scores = fa.amax(1)
        maps = layout.to_grid(fa[:, layout.n_prefix :].transpose(1, 2)).cpu()  # [B, F, n_time, gh, gw]
        B = images.shape[0]
        cand_vals = torch.cat([best_vals, scores.T.cpu()], dim=1)  # [F, k' + B]
        cand_idx = torch.cat([best_idx, torch.arange(seen, seen + B).expand(F_, B)], dim=1)
        top = cand_vals.topk(min(k, cand_vals.shape[1]), dim=1).indices  # [F, k]
        imgs_cpu = images.detach().float().cpu()
        new_imgs, new_maps = [], []
        for f in range(F_):
            pool_imgs = imgs_cpu if best_imgs is None else torch.cat([best_imgs[f], imgs_cpu])
            pool_maps = maps[:, f] if best_maps is None else torch.cat([best_maps[f], maps[:, f]])
            new_imgs.append(pool_imgs[top[f]])
            new_maps.append(pool_maps[top[f]])
        best_vals, best_idx = cand_vals.gather(1, top), cand_idx.gather(1, top)
        best_imgs, best_maps = torch.stack(new_imgs), torch.stack(new_maps)
        seen += B
    if best_imgs is None:
        raise ValueError(f"The {split} split yielded no images.")
    return TopActivating(features, best_vals, best_idx, best_imgs, best_maps, layout, seen)


def plot_top_activating(result: TopActivating, alpha: float = 0.55, time: int = 0) -> Figure:
    """Image grid: one row per feature, its top images left to right with the feature's patch heatmap on top.

    Heatmaps share one colour scale per feature (its largest activation); titles give each image's score.
    """
    F_, k = result.values.shape
    fig = new_figure(1.6 * k + 0.8, 1.75 * F_ + 0.5)
    axes = fig.subplots(F_, k, squeeze=False)
    for f in range(F_):
        vmax = float(result.heatmaps[f].amax().clamp_min(1e-12))
        for j in range(k):
            ax = axes[f, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"feature {result.features[f]}", fontsize=8)
            if not torch.isfinite(result.values[f, j]):
                ax.axis("off")
                continue
            picture = display_image(result.images[f, j], time, result.layout.tubelet_size)
            heat = upsample_grid(result.heatmaps[f, j, time], picture.shape[:2])
            ax.imshow(picture)
            ax.imshow(heat, cmap="hot", alpha=alpha, vmin=0, vmax=vmax)
            ax.set_title(f"#{int(result.indices[f, j])}: {float(result.values[f, j]):.2f}", fontsize=7)
    fig.suptitle(f"Top-{k} activating images per feature ({result.n_images} images scanned)", fontsize=10)
    return fig


def save_top_activating(result: TopActivating, path: str | Path, dpi: int = 120) -> Path:
    """Save :func:`plot_top_activating` as an image file (format from the suffix, e.g. ``.png``), atomically: a
    crash mid-write leaves any previous file as it was. Returns the path."""
    return save_figure_atomic(plot_top_activating(result), path, dpi=dpi)
