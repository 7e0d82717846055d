"""SAE files: our folder format (SAELens-compatible), SAELens folders, and ViT-Prisma checkpoints.

Native / SAELens folder::

    cfg.json                   SAELens keys (architecture, d_in, d_sae, hook_name, metadata, ...) and, under
                               "prisma_lightning", our full config and the activation-normalisation factors
    sae_weights.safetensors    W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out]
                               (+ threshold [d_sae] for jumprelu / batchtopk, b_gate/r_mag/b_mag for gated,
                               W_skip [d_out, d_in] for skip transcoders; each architecture names its own tensors)
    sparsity.safetensors       optional: "sparsity" [d_sae], log10 feature firing rates

The weights file is what any reader applies to *raw* activations: an ``expected_norm`` SAE is written with its
scaling factor folded into the weights (``normalize_activations: "none"`` in the SAELens fields), so SAELens and
this project reconstruct identically. Our own block records the factors, and :func:`load_sae` unfolds them again
on request (:meth:`SparseAutoencoder.unfold_activation_norm`, which fine-tuning calls) so a loaded SAE trains on as
it did. A loaded SAE is the file's inference form: ``normalize_activations`` reads ``none`` for a folded SAE.

Every file is dispatched through the architecture registry: each architecture class names its tensors
(``file_tensors``), how to read them back (``load_file_tensor``), its SAELens fields (``saelens_fields``) and the
SAELens architecture names it reads (``saelens_names``). Every field read from a file is validated; errors name
the file and the field.

ViT-Prisma: ``weights.pt`` or ``n_images_*.pt`` beside a ``config.json`` with ViT-Prisma's field names. Its
trainer pickles its runner config into ``n_images_*.pt``; such files are read by :mod:`.pickle_reader`, a restricted
unpickler that rebuilds tensors and turns every other object into inert data (no code from the file runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..utils import atomic_path, hub_download
from . import registry
from .config import SAEConfig, TranscoderConfig
from .sparse_autoencoder import SparseAutoencoder

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
PRISMA_KEY = "prisma_lightning"
FORMAT_VERSION = 2
"""1: weights stored unfolded (an ``expected_norm`` SAE's factor in our block only); 2: folded into the weights."""
SAELENS_VERSION = "6.0.0"
"""The SAELens format our ``cfg.json`` follows (its ``metadata.sae_lens_version``; absent means pre-6.0)."""

_FROM_SAELENS_NORM = {
    "none": "none",
    "expected_average_only_in": "none",  # identity at inference: SAELens folds the factor into finished SAEs
    "covariance_whitening": "none",  # likewise folded at the end of training
    "layer_norm": "layer_norm",
    "constant_norm_rescale": "constant_norm_rescale",
}
_TRANSCODER_NAMES = {
    "transcoder": "standard",
    "skip_transcoder": "standard",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}


# ---------------------------------------------------------------------------------------------------- saving
def _saelens_cfg(sae: SparseAutoencoder) -> dict[str, Any]:
    """The SAELens fields of ``cfg.json`` for the (folded) weights in the file."""
    cfg = sae.cfg
    hook_layer = cfg.hook_layer if cfg.hook_layer is not None else -1
    fields = sae.saelens_fields()
    activation_kwargs = fields.pop("activation_fn_kwargs", {})
    hook_name_out = fields.pop("hook_name_out", None)
    out: dict[str, Any] = {
        "architecture": fields.pop("architecture"),
        "d_in": cfg.d_in,
        "d_sae": sae.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input and not sae.is_transcoder),
        # expected_norm is folded into the weights; the per-token modes are applied by SAELens too
        "normalize_activations": cfg.normalize_activations if cfg.normalize_activations != "expected_norm" else "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "hook_layer": hook_layer,
            "hook_head_index": None,
            "context_size": cfg.context_size,
            "prepend_bos": False,
            "dataset_path": "",
            "neuronpedia_id": None,
            "model_class_name": "HookedViT",
            "model_from_pretrained_kwargs": {},
            "exclude_special_tokens": False,
            "sequence_separator_token": None,
            "disable_concat_sequences": False,
            **({"hook_name_out": hook_name_out} if sae.is_transcoder else {}),
        },
        # the same provenance at the top level, where SAELens before 6.0 and other readers look for it
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "activation_fn_str": "topk" if "k" in activation_kwargs else "relu",
        "activation_fn_kwargs": activation_kwargs,
        "finetuning_scaling_factor": False,
        "prepend_bos": False,
        "dataset_path": "",
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
    }
    out.update(fields)
    if sae.is_transcoder:
        out["hook_name_out"] = hook_name_out
    return out


def _weights_to_save(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sae.file_tensors().items()}


def save_sae(sae: SparseAutoencoder, path: str | Path, sparsity: Tensor | None = None) -> Path:
    """Write ``sae`` into folder ``path`` (created if needed); each file is written atomically.

    An ``expected_norm`` SAE is written with its factor folded into the weights (on a copy: ``sae`` itself is
    unchanged), so readers that apply no normalisation (SAELens) reconstruct exactly what this project does.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    scales = (float(sae.norm_scale_in), float(sae.norm_scale_out))
    if sae.cfg.normalize_activations == "expected_norm":
        sae._check_fitted()
        written = _folded_copy(sae)
    else:
        written = sae
    cfg = _saelens_cfg(written)
    cfg[PRISMA_KEY] = {
        "format_version": FORMAT_VERSION,
        "class": "Transcoder" if sae.is_transcoder else "SparseAutoencoder",
        "config": sae.cfg.to_dict(),
        "folded_norm_scale_in": scales[0] if written is not sae else None,
        "folded_norm_scale_out": scales[1] if written is not sae else None,
    }
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(_weights_to_save(written), str(tmp), metadata={"format": "pt"})
    for name, tensors in written.extra_files().items():
        with atomic_path(folder / name) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"}
            )
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, allow_nan=False) + "\n")
    if sparsity is not None:
        save_sparsity(folder, sparsity, d_sae=sae.d_sae)
    return folder


def _folded_copy(sae: SparseAutoencoder) -> SparseAutoencoder:
    """A copy of ``sae`` with the ``expected_norm`` factor folded into its weights (``sae`` is untouched)."""
    import copy

    clone = copy.deepcopy(sae)
    clone.cfg = copy.deepcopy(sae.cfg)
    clone.fold_activation_norm_scaling_factor()
    return clone


def save_sparsity(folder: str | Path, log10_density: Tensor, d_sae: int | None = None) -> Path:
    """Write ``sparsity.safetensors`` (key ``sparsity``: log10 firing rate of each feature, ``[d_sae]``)."""
    if log10_density.ndim != 1 or (d_sae is not None and log10_density.numel() != d_sae):
        raise ValueError(f"sparsity must have shape [d_sae]={[d_sae]}, got {list(log10_density.shape)}.")
    target = Path(folder) / SPARSITY_FILE
    with atomic_path(target) as tmp:
        save_file({"sparsity": log10_density.detach().cpu().contiguous()}, str(tmp), metadata={"format": "pt"})
    return target


def load_sparsity(folder: str | Path) -> Tensor | None:
    """The ``sparsity`` tensor of ``folder/sparsity.safetensors``, or None if there is no such file."""
    file = Path(folder) / SPARSITY_FILE
    if not file.exists():
        return None
    tensors = _read_safetensors(file)
    if "sparsity" not in tensors:
        raise ValueError(f"{file}: missing tensor 'sparsity' (found {sorted(tensors)}).")
    return tensors["sparsity"]


# ---------------------------------------------------------------------------------------------------- reading
def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); re-save the SAE or fix the file.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object (field -> value), got {type(data).__name__}.")
    return data


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{file} is not a readable safetensors file ({err}).") from err


def _require(data: dict[str, Any], key: str, file: Path) -> Any:
    if data.get(key) is None:
        raise ValueError(f"{file}: missing field {key!r} (found fields {sorted(data)}).")
    return data[key]


def _int_field(data: dict[str, Any], key: str, file: Path) -> int:
    value = _require(data, key, file)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{file}: field {key!r} must be a positive integer, got {value!r}.")
    return value


def _scale_field(data: dict[str, Any], key: str, file: Path) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{file}: field {key!r} must be a positive finite number, got {value!r}.")
    return float(value)


def _assign(sae: SparseAutoencoder, tensors: dict[str, Tensor], file: Path) -> SparseAutoencoder:
    """Copy file tensors into ``sae`` after checking names, shapes and values; the architecture maps layouts."""
    expected = {k: tuple(v.shape) for k, v in sae.file_tensors().items()}
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(
                f"{file}: missing tensor {key!r} for a {sae.cfg.architecture} SAE (found {sorted(tensors)})."
            )
        got = tuple(tensors[key].shape)
        if not sae.file_shape_ok(key, got):
            raise ValueError(
                f"{file}: tensor {key!r} has shape {list(got)}, expected {list(shape)} "
                f"(d_in={sae.d_in}, d_sae={sae.d_sae}, d_out={sae.d_out}); the config and the weights disagree."
            )
        if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(f"{file}: tensor {key!r} holds NaN or infinite values; the SAE is broken.")
    with torch.no_grad():
        for key in expected:
            sae.load_file_tensor(key, tensors[key].to(device=sae.b_dec.device, dtype=sae.b_dec.dtype), file)
    return sae


def _build(cfg: SAEConfig, file: Path) -> SparseAutoencoder:
    try:
        return SparseAutoencoder(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: invalid SAE configuration: {err}") from err


def saelens_version(raw: dict[str, Any]) -> str | None:
    """The SAELens version a ``cfg.json`` declares (top level first, then ``metadata``), as SAELens reads it."""
    version = raw.get("sae_lens_version")
    meta = raw.get("metadata")
    if not version and isinstance(meta, dict):
        version = meta.get("sae_lens_version")
    return str(version) if version else None


def _is_pre_6(version: str | None) -> bool:
    if not version:
        return True
    match = re.match(r"(\d+)", version)
    return match is None or int(match.group(1)) < 6


def _pre_6_config(raw: dict[str, Any]) -> dict[str, Any]:
    """SAELens's conversion of a pre-6.0 ``cfg.json`` (its ``handle_pre_6_0_config``): renamed keys, defaults, the
    TopK detection from ``activation_fn``, and metadata rebuilt from the top-level provenance keys."""
    cfg = dict(raw)
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                     ("activation_fn_str", "activation_fn")):  # fmt: skip
        if old in cfg:
            cfg[new] = cfg.pop(old)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("activation_fn", "relu")
    cfg.setdefault("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg["activation_fn"] == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    norm = cfg.get("normalize_activations")
    cfg["normalize_activations"] = {False: "none", True: "expected_average_only_in", None: "none"}.get(norm, norm)
    cfg["metadata"] = {k: raw[k] for k in _LLM_METADATA_KEYS if k in raw}
    return cfg


_LLM_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                      "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                      "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out")  # fmt: skip


def _config_from_saelens(raw: dict[str, Any], file: Path, overrides: dict[str, Any]) -> SAEConfig:
    """Our config of a SAELens ``cfg.json``, read field by field as SAELens 6 reads it (``tests/fixtures/saelens/
    LOADER.md``): the version decides the pre-6.0 conversion; every value is validated."""
    if _is_pre_6(saelens_version(raw)):
        raw = _pre_6_config(raw)
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    name = raw.get("architecture")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{file}: field 'architecture' must be a string (SAELens 6 requires it), got {name!r}.")
    is_transcoder = name in _TRANSCODER_NAMES
    cls = registry.saelens_class(_TRANSCODER_NAMES.get(name, name))
    if cls is None:
        known = sorted({*registry.saelens_names(), *_TRANSCODER_NAMES})
        raise ValueError(f"{file}: field 'architecture'={name!r} is not supported; known: {known}.")
    norm = raw.get("normalize_activations", "none")
    if norm not in _FROM_SAELENS_NORM:
        raise ValueError(
            f"{file}: field 'normalize_activations'={norm!r} is not one SAELens applies at inference "
            f"({sorted(k for k in _FROM_SAELENS_NORM if k)})."
        )
    ours = _FROM_SAELENS_NORM[norm]
    scaler = file.parent / "activation_scaler.json"
    if norm in ("expected_average_only_in", "covariance_whitening") and scaler.is_file():
        log.warning(
            "%s: normalize_activations=%r and an activation_scaler.json: a SAELens checkpoint taken during training "
            "(weights not folded). SAELens applies no scaling to it at inference, and neither does this loader "
            "(the outputs match SAELens); fold the factor in with SAELens before using it for analysis.",
            file, norm,
        )  # fmt: skip
    if is_transcoder and ours != "none":
        raise ValueError(
            f"{file}: a SAELens transcoder with normalize_activations={norm!r} leaves its output normalised (SAELens "
            "never un-normalises a transcoder's output), which prisma-lightning transcoders do not reproduce."
        )
    if is_transcoder and raw.get("apply_b_dec_to_input", False):
        raise ValueError(f"{file}: field 'apply_b_dec_to_input' must be false for a SAELens transcoder.")
    dtype = raw.get("dtype", "float32")
    if not isinstance(dtype, str):
        raise ValueError(f"{file}: field 'dtype' must be a string such as 'float32', got {dtype!r}.")
    apply_b_dec = raw.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"{file}: field 'apply_b_dec_to_input' must be true or false, got {apply_b_dec!r}.")
    kwargs: dict[str, Any] = {
        "architecture": cls.architecture,
        "d_in": _int_field(raw, "d_in", file),
        "d_sae": _int_field(raw, "d_sae", file),
        "normalize_activations": ours,
        "apply_b_dec_to_input": apply_b_dec and not is_transcoder,
        "hook_name": meta.get("hook_name") or raw.get("hook_name") or "",
        "hook_name_out": meta.get("hook_name_out") or raw.get("hook_name_out"),
        "model_name": meta.get("model_name") or raw.get("model_name") or "",
        "context_size": meta.get("context_size") or raw.get("context_size"),
        "dtype": dtype.removeprefix("torch."),
        "device": "cpu",
        **cls.config_from_saelens(raw, file),
    }
    kwargs.update(overrides)
    try:
        if is_transcoder:
            skip = name in ("skip_transcoder", "jumprelu_skip_transcoder")
            return TranscoderConfig(**kwargs, d_out=_int_field(raw, "d_out", file), skip_connection=skip)
        return SAEConfig(**kwargs)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def _load_folder(folder: Path, overrides: dict[str, Any]) -> SparseAutoencoder:
    cfg_file = folder / CFG_FILE
    raw = _read_json(cfg_file)
    tensors = _read_safetensors(folder / WEIGHTS_FILE)
    block = raw.get(PRISMA_KEY)
    if block is None:
        if "threshold" not in tensors and "topk_threshold" in tensors:  # a SAELens BatchTopK training checkpoint
            tensors["threshold"] = tensors.pop("topk_threshold")
        if "threshold" not in tensors and "log_threshold" in tensors:  # an older JumpReLU training checkpoint
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        cfg = _config_from_saelens(raw, cfg_file, {"device": "cpu", **overrides})
        sae = _assign(_build(cfg, cfg_file), tensors, folder / WEIGHTS_FILE)
        sae.after_saelens_load(raw)
        return sae
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise ValueError(f"{cfg_file}: field '{PRISMA_KEY}' must be an object with a 'config' object.")
    version = block.get("format_version", 1)
    if version not in (1, 2):
        raise ValueError(
            f"{cfg_file}: field '{PRISMA_KEY}.format_version'={version!r} is newer than this prisma-lightning "
            f"reads (1, 2); upgrade prisma-lightning."
        )
    stored = block["config"]
    if "device" not in overrides and not _device_available(str(stored.get("device", "cpu"))):
        overrides = {**overrides, "device": "cpu"}  # trained on an accelerator this machine lacks
    config_cls = TranscoderConfig if block.get("class") == "Transcoder" else SAEConfig
    try:
        cfg = config_cls.from_dict({**stored, **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: field '{PRISMA_KEY}.config': {err}") from err
    if version == 1:
        return _load_v1(cfg, block, tensors, folder)
    s_in = _scale_field(block, "folded_norm_scale_in", cfg_file)
    s_out = _scale_field(block, "folded_norm_scale_out", cfg_file)
    folded = cfg.normalize_activations == "expected_norm"
    if folded and (s_in is None or s_out is None):
        raise ValueError(
            f"{cfg_file}: an expected_norm SAE needs fields '{PRISMA_KEY}.folded_norm_scale_in' and "
            f"'folded_norm_scale_out' (positive numbers); the file is incomplete."
        )
    if folded:
        cfg.normalize_activations = "none"  # the file's weights read raw activations
    sae = _assign(_build(cfg, cfg_file), tensors, folder / WEIGHTS_FILE)
    if folded:
        sae.folded_norm_scales = (s_in, s_out)  # type: ignore[assignment]
    return sae


def _load_v1(cfg: SAEConfig, block: dict[str, Any], tensors: dict[str, Tensor], folder: Path) -> SparseAutoencoder:
    """Folders of format 1 stored the weights unfolded and the factors in our block."""
    cfg_file = folder / CFG_FILE
    if "b_in" in tensors and "b_enc" in tensors and "W_enc" in tensors:  # format 1 stored a transcoder's input bias
        tensors = dict(tensors)
        tensors["b_enc"] = tensors["b_enc"] - tensors.pop("b_in") @ tensors["W_enc"]
    sae = _assign(_build(cfg, cfg_file), tensors, folder / WEIGHTS_FILE)
    s_in = _scale_field(block, "norm_scale_in", cfg_file)
    s_out = _scale_field(block, "norm_scale_out", cfg_file)
    with torch.no_grad():
        sae.norm_scale_in.fill_(1.0 if s_in is None else s_in)
        sae.norm_scale_out.fill_(1.0 if s_out is None else s_out)
    sae._norm_fitted = bool(block.get("norm_fitted", True))
    return sae


def _device_available(name: str) -> bool:
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return True


# ---------------------------------------------------------------------------------------------------- ViT-Prisma
def _vit_prisma_weights_file(folder: Path) -> Path | None:
    if (folder / "weights.pt").is_file():
        return folder / "weights.pt"
    numbered = []
    for p in folder.glob("n_images_*.pt"):
        m = re.fullmatch(r"n_images_(\d+)\.pt", p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    return max(numbered)[1] if numbered else None


def _config_from_vit_prisma(raw: dict[str, Any], file: Path, overrides: dict[str, Any]) -> SAEConfig:
    d_in = _int_field(raw, "d_in", file)
    d_sae = raw.get("d_sae") or d_in * _int_field(raw, "expansion_factor", file)
    act = raw.get("activation_fn_str", "relu")
    family = raw.get("architecture") or "standard"
    # ViT-Prisma names an architecture like SAELens does, except that "standard" + activation_fn_str "topk" is TopK
    saelens_name = family if family != "standard" or act == "relu" else act
    cls = registry.saelens_class(str(saelens_name))
    if cls is None:
        field = "architecture" if family != "standard" else "activation_fn_str"
        raise ValueError(
            f"{file}: field {field!r}={raw.get(field)!r} names no registered architecture (ViT-Prisma architectures "
            f"read here: standard with activation_fn_str relu or topk, {', '.join(registry.saelens_names())})."
        )
    arch = cls.architecture
    norm = raw.get("normalize_activations") or "none"
    if norm not in ("none", "layer_norm"):
        raise ValueError(f"{file}: field 'normalize_activations'={norm!r} is not supported (none, layer_norm).")
    hook = raw.get("hook_point")
    if not hook:
        hook = f"blocks.{_require(raw, 'hook_point_layer', file)}.{_require(raw, 'layer_subtype', file)}"
    tokens = "cls" if raw.get("cls_token_only") else "patches" if raw.get("use_patches_only") else "all"
    kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": int(d_sae),
        "architecture": arch,
        "normalize_activations": norm,
        "apply_b_dec_to_input": True,  # ViT-Prisma always centres the input with b_dec
        "hook_name": hook,
        "tokens": tokens,
        "model_name": raw.get("model_name") or "",
        "context_size": raw.get("context_size"),
        "dtype": str(raw.get("_dtype") or raw.get("dtype") or "float32").removeprefix("torch."),
        "b_dec_init": raw.get("b_dec_init_method") or "geometric_median",
    }
    kwargs.update(cls.config_from_saelens(raw, file))  # architecture options (TopK's k) are read as SAELens's are
    own = {f.name for f in dataclasses.fields(cls.config_class)}
    if "l1_coefficient" in own and isinstance(raw.get("l1_coefficient"), int | float):
        kwargs["l1_coefficient"] = float(raw["l1_coefficient"])
    kwargs.update(overrides)
    try:
        if raw.get("is_transcoder"):
            skip = bool(raw.get("transcoder_with_skip_connection", True))
            if skip and norm != "none":
                raise ValueError(
                    "ViT-Prisma adds the skip path to the raw input inside its output normalisation, which this "
                    "Transcoder does not reproduce; only normalize_activations='none' skip transcoders load exactly"
                )
            out_hook = f"blocks.{raw.get('out_hook_point_layer')}.{raw.get('layer_out_subtype')}"
            return TranscoderConfig(
                **kwargs, d_out=int(raw.get("d_out", d_in)), skip_connection=skip, hook_name_out=out_hook
            )
        return SAEConfig(**kwargs)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def _load_vit_prisma(weights: Path, overrides: dict[str, Any]) -> SparseAutoencoder:
    from .pickle_reader import read_tensors

    cfg_file = weights.parent / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{weights} needs its ViT-Prisma config.json beside it ({cfg_file} is missing).")
    cfg = _config_from_vit_prisma(_read_json(cfg_file), cfg_file, overrides)
    tensors = read_tensors(weights)
    if isinstance(cfg, TranscoderConfig):
        tensors = dict(tensors)
        if "b_dec_out" not in tensors:
            raise ValueError(f"{weights}: missing tensor 'b_dec_out' for a ViT-Prisma transcoder.")
        b_in = tensors.pop("b_dec", None)  # ViT-Prisma's b_dec centres the input; b_dec_out is the output bias
        tensors["b_dec"] = tensors.pop("b_dec_out")
        if b_in is not None and "b_enc" in tensors and "W_enc" in tensors:
            tensors["b_enc"] = tensors["b_enc"] - b_in @ tensors["W_enc"]  # the input bias folded into b_enc
    return _assign(_build(cfg, cfg_file), tensors, weights)


# ---------------------------------------------------------------------------------------------------- entry points
def _overrides(device: str | None, dtype: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if device is not None:
        out["device"] = str(device)
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _check_class(sae: SparseAutoencoder, expected: type | None, where: Path | str) -> SparseAutoencoder:
    if expected is not None and not isinstance(sae, expected):
        raise ValueError(f"{where} holds a {type(sae).__name__}, not a {expected.__name__}.")
    return sae


def load_sae(
    path: str | Path, device: str | None = None, dtype: str | None = None, expected: type | None = None
) -> SparseAutoencoder:
    """Load an SAE or transcoder from a folder (ours / SAELens / ViT-Prisma) or a ViT-Prisma ``.pt`` file."""
    p = Path(path)
    overrides = _overrides(device, dtype)
    if p.is_file():
        if p.suffix == ".pt":
            return _check_class(_load_vit_prisma(p, overrides), expected, p)
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"No SAE at {p}: it is neither a folder nor a ViT-Prisma .pt file.")
    if (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
        return _check_class(_load_folder(p, overrides), expected, p)
    weights = _vit_prisma_weights_file(p)
    if weights is not None:
        return _check_class(_load_vit_prisma(weights, overrides), expected, p)
    raise FileNotFoundError(
        f"{p} holds neither {CFG_FILE} + {WEIGHTS_FILE} (prisma-lightning / SAELens) nor a ViT-Prisma "
        "weights.pt / n_images_*.pt with config.json."
    )


def sae_from_pretrained(
    repo_id: str,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    expected: type | None = None,
) -> SparseAutoencoder:
    """Download ``cfg.json`` + ``sae_weights.safetensors`` (or ViT-Prisma files) from the Hub and load them."""
    try:
        cfg_path = hub_download(repo_id, CFG_FILE, revision=revision, subfolder=subfolder)
        hub_download(repo_id, WEIGHTS_FILE, revision=revision, subfolder=subfolder)
    except FileNotFoundError as native_err:
        try:
            config_path = hub_download(repo_id, "config.json", revision=revision, subfolder=subfolder)
            weights = _vit_prisma_hub_weights(repo_id, subfolder, revision)
        except FileNotFoundError as prisma_err:
            raise FileNotFoundError(
                f"{repo_id}: found neither {CFG_FILE} + {WEIGHTS_FILE} ({native_err}) nor ViT-Prisma config.json + "
                f"weights ({prisma_err})."
            ) from prisma_err
        if Path(weights).parent != Path(config_path).parent:
            raise FileNotFoundError(
                f"{repo_id}: config.json and {Path(weights).name} are in different folders."
            ) from native_err
        return load_sae(weights, device=device, expected=expected)
    for name in (SPARSITY_FILE, *_extra_file_names(Path(cfg_path))):
        try:
            hub_download(repo_id, name, revision=revision, subfolder=subfolder)
        except FileNotFoundError:
            pass  # optional files: sparsity, architecture extras (loading says what a missing extra means)
    return load_sae(Path(cfg_path).parent, device=device, expected=expected)


def _extra_file_names(cfg_file: Path) -> tuple[str, ...]:
    """The extra files of the architecture named in a downloaded ``cfg.json`` (none when it names no known one)."""
    try:
        raw = _read_json(cfg_file)
    except ValueError:
        return ()
    block = raw.get(PRISMA_KEY)  # extras are ours: folders written by SAELens itself have none
    config = block.get("config") if isinstance(block, dict) else None
    if not isinstance(config, dict):
        return ()
    try:
        return registry.architecture_class(str(config.get("architecture"))).extra_file_names
    except (KeyError, ValueError):
        return ()


def _vit_prisma_hub_weights(repo_id: str, subfolder: str | None, revision: str | None) -> str:
    try:
        return hub_download(repo_id, "weights.pt", revision=revision, subfolder=subfolder)
    except FileNotFoundError:
        from huggingface_hub import list_repo_files

        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        names = [
            f[len(prefix) :]
            for f in list_repo_files(repo_id, revision=revision)
            if f.startswith(prefix) and re.fullmatch(r"n_images_\d+\.pt", f[len(prefix) :])
        ]
        if not names:
            raise
        latest = max(names, key=lambda n: int(n[len("n_images_") : -3]))
        return hub_download(repo_id, latest, revision=revision, subfolder=subfolder)
