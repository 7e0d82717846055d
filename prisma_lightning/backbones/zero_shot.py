"""CLIP-style zero-shot classifier: class-name x prompt-template text embeddings used as a linear head.

A CLIP (or SigLIP) model classifies an image without training a head: each class name is written into
prompt templates ("a photo of a {}."), the text tower embeds every prompt, the unit-normalised prompt
embeddings of a class are averaged and renormalised, and the image embedding's scaled cosine similarity
with each class embedding is that class's logit (Radford et al. 2021, the recipe of OpenAI's notebook
and of ``open_clip.zero_shot_classifier``).

:class:`ZeroShotClassifier` holds the result: ``weights [d_embed, n_classes]`` with unit-norm columns,
the exp'd temperature ``logit_scale`` (e.g. 100.0) and, for SigLIP, ``logit_bias``. It is the head the
SAE evaluator uses to compute cross-entropy for CLIP backbones (see DESIGN.md, "Evaluation").
``ZeroShotClassifier.from_clip`` builds one from a Hugging Face ``CLIPModel`` / ``SiglipModel`` or an
open_clip ``CLIP`` / ``CustomTextCLIP``; ``save`` / ``load`` use a single safetensors file (never pickle).

The standard ImageNet-1k class names and the 80 CLIP templates ship as package data
(:func:`imagenet_class_names`, :func:`clip_templates`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prisma_lightning.utils import atomic_path

__all__ = ["SUPPORTED_SOURCES", "ZeroShotClassifier", "clip_templates", "imagenet_class_names"]

_DATA_PACKAGE = "prisma_lightning.backbones.data"
_FORMAT_NAME = "prisma_lightning.zero_shot_classifier"
_FORMAT_VERSION = "1"

#: Source models :meth:`ZeroShotClassifier.from_clip` accepts (subclasses included).
SUPPORTED_SOURCES: tuple[str, ...] = (
    "transformers.CLIPModel",
    "transformers.SiglipModel",
    "open_clip.model.CLIP",
    "open_clip.model.CustomTextCLIP",
)

_SourceKind = Literal["hf_clip", "hf_siglip", "open_clip"]
Tokenizer = Callable[[list[str]], Any]
"""Maps a list of prompts to token ids: a ``LongTensor [N, T]`` or a mapping with ``input_ids`` (and optionally
``attention_mask``), as returned by a Hugging Face tokenizer or ``open_clip.get_tokenizer(...)``."""


# --------------------------------------------------------------------------------------------------------------------
# Package data
# --------------------------------------------------------------------------------------------------------------------


@cache
def _read_string_list(filename: str) -> tuple[str, ...]:
    """Read a JSON list of strings from the package data folder (cached; callers get a fresh list)."""
    text = resources.files(_DATA_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    values = json.loads(text)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"Package data file {_DATA_PACKAGE}/{filename} must hold a JSON list of strings; reinstall.")
    return tuple(values)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names used by CLIP's zero-shot evaluation, in class-index order.

    These are OpenAI's curated human-readable names (as in ``open_clip.zero_shot_metadata``), kept verbatim so
    that zero-shot accuracies match published numbers. Two names occur twice, as in the original list:
    ``"missile"`` (classes 657 and 744) and ``"sunglasses"`` (836 and 837).
    """
    return list(_read_string_list("imagenet_classes.json"))


def clip_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, each a string with ``{}`` where the class name goes."""
    return list(_read_string_list("clip_templates.json"))


# --------------------------------------------------------------------------------------------------------------------
# Source-model helpers
# --------------------------------------------------------------------------------------------------------------------


def _from_library(model: object, prefix: str) -> bool:
    """Whether ``model``'s class (or a base class) is defined in the library whose modules start with ``prefix``."""
    return any(cls.__module__.startswith(prefix) for cls in type(model).__mro__)


def _source_kind(model: object) -> _SourceKind:
    """Classify a source model, importing its library only when the model comes from it."""
    if _from_library(model, "transformers."):
        from transformers import CLIPModel, SiglipModel

        if isinstance(model, SiglipModel):
            return "hf_siglip"
        if isinstance(model, CLIPModel):
            return "hf_clip"
    if _from_library(model, "open_clip."):
        from open_clip.model import CLIP, CustomTextCLIP

        if isinstance(model, (CLIP, CustomTextCLIP)):
            return "open_clip"
    raise TypeError(
        f"ZeroShotClassifier.from_clip got a {type(model).__module__}.{type(model).__qualname__}, which it cannot "
        f"use. Supported source models (with a text tower): {', '.join(SUPPORTED_SOURCES)}. Load the full "
        "image-text model (e.g. transformers.CLIPModel, not CLIPVisionModel), or build the classifier yourself with "
        "ZeroShotClassifier(weights, logit_scale, class_names=...)."
    )


def _is_hf_tokenizer(tokenizer: object) -> bool:
    """Whether ``tokenizer`` is a Hugging Face tokenizer (which needs padding / return_tensors arguments)."""
    if not _from_library(tokenizer, "transformers."):
        return False
    from transformers import PreTrainedTokenizerBase

    return isinstance(tokenizer, PreTrainedTokenizerBase)


def _text_context_length(model: nn.Module, kind: _SourceKind) -> int | None:
    """The text tower's maximum sequence length, or None if the model does not say."""
    if kind == "open_clip":
        return getattr(model, "context_length", None)
    return getattr(model.config.text_config, "max_position_embeddings", None)


def _tokenize(
    tokenizer: Tokenizer, texts: list[str], model: nn.Module, kind: _SourceKind
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenise prompts; returns ``input_ids [N, T]`` and ``attention_mask [N, T]`` (or None)."""
    if _is_hf_tokenizer(tokenizer):
        max_length = _text_context_length(model, kind)
        # SigLIP pools the last position, so it was trained on prompts padded to the full length (HF model card).
        padding = "max_length" if kind == "hf_siglip" or kind == "open_clip" else True
        out = tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    else:
        out = tokenizer(texts)

    mask = None
    if isinstance(out, torch.Tensor):
        ids = out
    elif isinstance(out, Mapping):
        if "input_ids" not in out:
            raise TypeError(
                f"The tokenizer returned a mapping with keys {sorted(out)}; expected an 'input_ids' entry. Pass a "
                "tokenizer that returns a LongTensor [N, T] or a dict with 'input_ids' (and optional 'attention_mask')."
            )
        ids = out["input_ids"]
        mask = out.get("attention_mask")
    else:
        raise TypeError(
            f"The tokenizer returned a {type(out).__name__}; expected a LongTensor [N, T] or a mapping with "
            "'input_ids' (and optional 'attention_mask'), as Hugging Face and open_clip tokenizers return."
        )
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] != len(texts):
        raise ValueError(
            f"The tokenizer returned input_ids of shape {tuple(ids.shape)} for {len(texts)} prompts; expected "
            f"[{len(texts)}, seq_len]. Make the tokenizer pad every prompt to one length and return a batch."
        )
    if kind == "hf_siglip":
        mask = None  # SigLIP was trained without a text attention mask; HF's SiglipTokenizer returns none either.
    elif mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.long)
    return ids, mask


def _embed_text(
    model: nn.Module, kind: _SourceKind, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Text embeddings ``[N, d_embed]`` (float32, not normalised) from the model's text tower and projection."""
    if kind == "open_clip":
        out = model.encode_text(input_ids)
    else:
        out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        if not isinstance(out, torch.Tensor):  # transformers >= 5 returns a ModelOutput with the projected pooler
            out = out.pooler_output
    return out.float()


def _logit_scale_and_bias(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's exp'd temperature and (SigLIP) bias as float32 scalars; both libraries store log(scale)."""
    scale = model.logit_scale.detach().float().exp()
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        bias = bias.detach().float()
    return _as_scalar(scale, "logit_scale"), None if bias is None else _as_scalar(bias, "logit_bias")


def _as_scalar(value: float | torch.Tensor, name: str) -> torch.Tensor:
    """A float32 0-d tensor from a number or a one-element tensor."""
    tensor = torch.as_tensor(value, dtype=torch.float32).detach()
    if tensor.numel() != 1:
        raise ValueError(f"{name} must be a single number; got a tensor of shape {tuple(tensor.shape)}.")
    return tensor.reshape(()).clone()


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    """Validate class names: a non-empty sequence (not a single string) of strings."""
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(
            f"class_names must be a list of strings; got {type(class_names).__name__} {class_names!r:.80}. "
            "Wrap a single name in a list."
        )
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty; pass at least one class name (or None for the 1000 ImageNet classes).")
    bad = [(i, n) for i, n in enumerate(names) if not isinstance(n, str)]
    if bad:
        i, n = bad[0]
        raise TypeError(f"class_names[{i}] is {type(n).__name__} {n!r}; every class name must be a string.")
    return names


def _check_templates(templates: Sequence[str]) -> list[str]:
    """Validate prompt templates: a non-empty sequence of strings that each contain ``{}``."""
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(
            f"templates must be a list of strings with '{{}}'; got {type(templates).__name__} {templates!r:.80}. "
            "Wrap a single template in a list."
        )
    result = list(templates)
    if not result:
        raise ValueError("templates is empty; pass at least one template such as 'a photo of a {}.' (or None).")
    for i, template in enumerate(result):
        if not isinstance(template, str):
            raise TypeError(
                f"templates[{i}] is {type(template).__name__} {template!r:.80}; templates must be strings with '{{}}' "
                "(convert an open_clip template callable `t` with t('{}'))."
            )
        if "{}" not in template:
            raise ValueError(
                f"templates[{i}] = {template!r} has no '{{}}' placeholder for the class name; write it like "
                "'a photo of a {}.'."
            )
    return result


def _fill(template: str, class_name: str) -> str:
    """Write a class name into every ``{}`` of a template (plain replacement, so other braces stay literal)."""
    return template.replace("{}", class_name)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------------------------


class ZeroShotClassifier(nn.Module):
    """A linear head ``logit_scale * normalize(image_embedding) @ weights (+ logit_bias)`` built from text embeddings.

    Args:
        weights: ``[d_embed, n_classes]`` class embeddings as columns, normally unit-norm (not renormalised here,
            so a saved classifier loads bit for bit).
        logit_scale: the *exp'd* temperature, e.g. 100.0 for OpenAI CLIP (``model.logit_scale.exp()``).
        logit_bias: an additive logit bias (SigLIP), or None (CLIP).
        class_names: one name per column; None names the classes ``"0"``, ``"1"``, ...
        templates: the prompt templates the weights were built from (kept as metadata only), or None.

    CLIP logits are meant for a softmax over classes. SigLIP models were trained with a per-pair sigmoid loss:
    ``torch.sigmoid(logits)`` gives independent per-class probabilities. The bias is the same for every class,
    so argmax and softmax cross-entropy (as used by the SAE evaluator) are unaffected by it.

    All tensors are buffers: ``.to(device)`` moves them and ``state_dict`` holds them. Nothing is trainable.
    """

    weights: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None

    def __init__(
        self,
        weights: torch.Tensor,
        logit_scale: float | torch.Tensor = 100.0,
        logit_bias: float | torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weights, torch.Tensor) or weights.ndim != 2:
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a 2-D tensor [d_embed, n_classes]; got {shape}.")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor; got dtype {weights.dtype}.")
        if weights.shape[1] == 0:
            raise ValueError("weights has 0 columns; a zero-shot classifier needs at least one class.")
        n_classes = weights.shape[1]
        names = [str(i) for i in range(n_classes)] if class_names is None else _check_class_names(class_names)
        if len(names) != n_classes:
            raise ValueError(
                f"Got {len(names)} class names for weights with {n_classes} columns (shape {tuple(weights.shape)}); "
                "weights must be [d_embed, n_classes] with one column per class name (transpose it if needed)."
            )
        self.class_names: list[str] = names
        self.templates: list[str] | None = None if templates is None else _check_templates(templates)
        self.register_buffer("weights", weights.detach())
        self.register_buffer("logit_scale", _as_scalar(logit_scale, "logit_scale"))
        self.register_buffer("logit_bias", None if logit_bias is None else _as_scalar(logit_bias, "logit_bias"))

    @property
    def d_embed(self) -> int:
        """Width of the joint image-text embedding space."""
        return self.weights.shape[0]

    @property
    def n_classes(self) -> int:
        """Number of classes (columns of ``weights``)."""
        return self.weights.shape[1]

    # ---------------------------------------------------------------------------------------------------------------
    # Construction from a CLIP model
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_clip(
        cls,
        source_model: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        show_progress: bool | None = None,
    ) -> ZeroShotClassifier:
        """Embed ``class_names x templates`` with the source model's text tower and build the classifier.

        For each class every template is filled in and embedded, each prompt embedding is L2-normalised, they are
        averaged and the mean is renormalised. ``logit_scale`` is ``source_model.logit_scale.exp()``; the bias is
        copied from SigLIP models (HF ``SiglipModel``, open_clip SigLIP models with ``logit_bias``).

        Args:
            source_model: a ``transformers.CLIPModel`` or ``SiglipModel``, or an open_clip ``CLIP`` /
                ``CustomTextCLIP`` (see :data:`SUPPORTED_SOURCES`). It is run in eval mode; its train/eval state is
                restored afterwards.
            tokenizer: the model's tokenizer. A Hugging Face tokenizer is called with padding and truncation to the
                model's text length (``padding="max_length"`` for SigLIP, as it was trained); any other callable
                (e.g. ``open_clip.get_tokenizer(name)``) is called as ``tokenizer(list_of_prompts)`` and must return
                a LongTensor ``[N, T]`` or a mapping with ``input_ids`` (and optional ``attention_mask``).
            class_names: class names in class-index order; None uses the 1000 ImageNet-1k names.
            templates: prompt templates with ``{}`` for the class name; None uses CLIP's 80 ImageNet templates.
            batch_size: prompts per text-tower forward pass (whole classes are grouped into a batch when they fit).
            device: where to run the text tower; None uses the model's device. The model is not moved, so pass
                the device it is on. The returned classifier lives on this device.
            show_progress: show a progress bar over classes; None shows one for 100 classes or more.

        Returns:
            The classifier, with ``weights [d_embed, n_classes]`` in float32.
        """
        kind = _source_kind(source_model)
        names = imagenet_class_names() if class_names is None else _check_class_names(class_names)
        prompts = clip_templates() if templates is None else _check_templates(templates)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        device = _model_device(source_model) if device is None else torch.device(device)
        show = len(names) >= 100 if show_progress is None else show_progress

        n_templates = len(prompts)
        classes_per_step = max(1, batch_size // n_templates)
        columns: list[torch.Tensor] = []
        was_training = source_model.training
        source_model.eval()
        try:
            from rich.progress import Progress

            with Progress(disable=not show, transient=True) as progress:
                task = progress.add_task("Embedding class prompts", total=len(names))
                for start in range(0, len(names), classes_per_step):
                    group = names[start : start + classes_per_step]
                    texts = [_fill(template, name) for name in group for template in prompts]
                    columns.append(
                        cls._embed_classes(source_model, kind, tokenizer, texts, n_templates, batch_size, device)
                    )
                    progress.advance(task, len(group))
        finally:
            source_model.train(was_training)

        weights = torch.cat(columns, dim=0).T.contiguous()  # [d_embed, n_classes]
        scale, bias = _logit_scale_and_bias(source_model)
        return cls(weights, scale, bias, class_names=names, templates=prompts).to(device)

    @staticmethod
    def _embed_classes(
        model: nn.Module,
        kind: _SourceKind,
        tokenizer: Tokenizer,
        texts: list[str],
        n_templates: int,
        batch_size: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Class embeddings ``[len(texts) // n_templates, d_embed]`` (unit-norm) for class-major prompt ``texts``."""
        input_ids, attention_mask = _tokenize(tokenizer, texts, model, kind)
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            chunks.append(_embed_text(model, kind, ids, mask))
        prompt_emb = F.normalize(torch.cat(chunks, dim=0), dim=-1)  # [n_group * n_templates, d]
        class_emb = prompt_emb.view(len(texts) // n_templates, n_templates, -1).mean(dim=1)
        return F.normalize(class_emb, dim=-1)  # [n_group, d]

    # ---------------------------------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------------------------------

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Class logits ``[..., n_classes]`` for image embeddings ``[..., d_embed]`` (normalised here).

        The embeddings must be in the joint space, i.e. after the vision projection (HF ``get_image_features``,
        open_clip ``encode_image``, or a HookedViT with its projection head).
        """
        if image_embeddings.shape[-1] != self.d_embed:
            raise ValueError(
                f"Image embeddings have width {image_embeddings.shape[-1]} (shape {tuple(image_embeddings.shape)}), "
                f"but this zero-shot classifier expects d_embed = {self.d_embed}. Pass embeddings after the vision "
                "projection of the same CLIP model the classifier was built from."
            )
        emb = F.normalize(image_embeddings.to(self.weights.dtype), dim=-1)
        logits = self.logit_scale.to(emb.dtype) * emb @ self.weights  # [..., n_classes]
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.to(logits.dtype)
        return logits

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`logits`: ``[..., d_embed] -> [..., n_classes]``."""
        return self.logits(image_embeddings)

    def extra_repr(self) -> str:
        bias = "" if self.logit_bias is None else f", logit_bias={self.logit_bias.item():.4g}"
        return f"d_embed={self.d_embed}, n_classes={self.n_classes}, logit_scale={self.logit_scale.item():.4g}{bias}"

    # ---------------------------------------------------------------------------------------------------------------
    # Files
    # ---------------------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier to one safetensors file, atomically; returns the path.

        Tensors: ``weights [d_embed, n_classes]``, ``logit_scale []`` (exp'd) and, if set, ``logit_bias []``.
        Metadata (strings): ``format``, ``format_version``, ``class_names`` and ``templates`` (JSON lists).
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"{path} is a directory; ZeroShotClassifier.save writes one file, "
                f"e.g. {path / 'zero_shot.safetensors'}."
            )
        tensors = {
            "weights": self.weights.detach().cpu().contiguous(),
            "logit_scale": self.logit_scale.detach().cpu().contiguous(),
        }
        if self.logit_bias is not None:
            tensors["logit_bias"] = self.logit_bias.detach().cpu().contiguous()
        metadata = {
            "format": "pt",
            "prisma_lightning_format": _FORMAT_NAME,
            "format_version": _FORMAT_VERSION,
            "class_names": json.dumps(self.class_names, ensure_ascii=False),
            "templates": json.dumps(self.templates, ensure_ascii=False),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> ZeroShotClassifier:
        """Read a classifier written by :meth:`save`. Only safetensors is read; pickle files are refused."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No zero-shot classifier file at {path}. Build one with ZeroShotClassifier.from_clip(...) and "
                "write it with .save(path)."
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as err:
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}). ZeroShotClassifier.load reads only the "
                "safetensors files that ZeroShotClassifier.save writes; pickle / torch.save files are refused "
                "because unpickling can run arbitrary code. Rebuild the classifier with from_clip and save it."
            ) from err

        for key in ("weights", "logit_scale"):
            if key not in tensors:
                raise ValueError(
                    f"{path} has no {key!r} tensor (it has {sorted(tensors)}); it was not written by "
                    "ZeroShotClassifier.save. Rebuild the classifier with from_clip and save it."
                )
        if "class_names" not in metadata:
            raise ValueError(
                f"{path} has no 'class_names' entry in its safetensors metadata (it has {sorted(metadata)}); it was "
                "not written by ZeroShotClassifier.save. Rebuild the classifier with from_clip and save it."
            )
        class_names = _parse_json_metadata(path, metadata, "class_names")
        templates = _parse_json_metadata(path, metadata, "templates") if "templates" in metadata else None
        try:
            classifier = cls(
                tensors["weights"],
                tensors["logit_scale"],
                tensors.get("logit_bias"),
                class_names=class_names,
                templates=templates,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} holds an invalid zero-shot classifier: {err}") from err
        return classifier if device is None else classifier.to(device)


def _parse_json_metadata(path: Path, metadata: dict[str, str], key: str) -> Any:
    """Decode one JSON-valued metadata entry of a saved classifier, naming the file and key on failure."""
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise ValueError(
            f"The {key!r} metadata entry of {path} is not valid JSON ({err}); the file is damaged. Rebuild the "
            "classifier with from_clip and save it."
        ) from err
