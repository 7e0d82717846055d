"""SAE files: our folder format (SAELens-compatible), SAELens folders, and ViT-Prisma checkpoints.

Native / SAELens folder::

    cfg.json                   SAELens keys (architecture, d_in, d_sae, hook_name, activation_fn_str, ...) and,
                               under "prisma_lightning", our full config and the fitted normalisation factors
    sae_weights.safetensors    W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out]
                               (+ threshold [d_sae] for jumprelu / batchtopk, b_gate/r_mag/b_mag for gated,
                               W_skip [d_out, d_in] for skip transcoders)
    sparsity.safetensors       optional: "sparsity" [d_sae], log10 feature firing rates

JumpReLU SAEs learn ``log_threshold``; files hold ``threshold = exp(log_threshold)``. Our own files round-trip
bitwise (the log is nudged to the float whose ``exp`` gives the stored value back); a threshold from another
library may not be an ``exp`` of any float32 and then loads to within one ulp.

SAELens architecture names map as standard -> relu, topk, jumprelu, gated, batchtopk, transcoder,
skip_transcoder, jumprelu_transcoder. BatchTopK SAEs are written as SAELens ``jumprelu`` (at inference a BatchTopK
SAE *is* a JumpReLU with one shared threshold, which is how SAELens itself saves them).

ViT-Prisma: ``weights.pt`` or ``n_images_*.pt`` (a dict of tensors, possibly under "state_dict") beside a
``config.json`` with ViT-Prisma's field names. ``.pt`` files are read with ``torch.load(weights_only=True)``
only: no pickled object from a file is ever executed; anything else is refused with a ``ValueError``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..utils import atomic_path, hub_download
from .config import BATCH_TOPK_FAMILY, SAEConfig, TranscoderConfig
from .sparse_autoencoder import SparseAutoencoder
from .transcoder import Transcoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
PRISMA_KEY = "prisma_lightning"
FORMAT_VERSION = 1

_TO_SAELENS_NORM = {"none": "none", "expected_norm": "expected_average_only_in", "layer_norm": "layer_norm"}
# SAELens applies "expected_average_only_in" only while training (its saved SAEs have the factor folded in).
_FROM_SAELENS_NORM = {"none": "none", "expected_average_only_in": "none", "layer_norm": "layer_norm", None: "none"}
_FROM_SAELENS_ARCH = {
    "standard": ("relu", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "gated": ("gated", False),
    "batchtopk": ("batchtopk", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
}


# ---------------------------------------------------------------------------------------------------- saving
def _saelens_architecture(sae: SparseAutoencoder) -> str:
    arch, transcoder = sae.cfg.architecture, isinstance(sae, Transcoder)
    if transcoder:
        base = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder"}.get(arch, arch)
        return "skip_transcoder" if base == "transcoder" and sae.cfg.skip_connection else base  # type: ignore[attr-defined]
    return {"relu": "standard", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}.get(arch, arch)


def _saelens_cfg(sae: SparseAutoencoder) -> dict[str, Any]:
    cfg = sae.cfg
    topk = cfg.architecture == "topk"
    out: dict[str, Any] = {
        "architecture": _saelens_architecture(sae),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.hook_layer if cfg.hook_layer is not None else -1,
        "hook_head_index": None,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input and not isinstance(sae, Transcoder)),
        "normalize_activations": _TO_SAELENS_NORM[cfg.normalize_activations],
        "finetuning_scaling_factor": False,
        "context_size": cfg.context_size,
        "prepend_bos": False,
        "dataset_path": "",
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "reshape_activations": "none",
    }
    if topk:
        out["k"] = cfg.k
    if isinstance(sae, Transcoder):
        out["d_out"] = sae.d_out
        out["hook_name_out"] = cfg.hook_name_out
    return out


def _file_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """The tensors of the weights file, in the file's layout (views of the module's parameters)."""
    arch = sae.cfg.architecture
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch == "gated":
        tensors.update(b_gate=sae.b_gate, r_mag=sae.r_mag, b_mag=sae.b_mag)
    else:
        tensors["b_enc"] = sae.b_enc
    if arch == "jumprelu" or arch in BATCH_TOPK_FAMILY:
        tensors["threshold"] = sae.threshold
    if hasattr(sae, "W_skip"):
        tensors["W_skip"] = sae.W_skip.t()  # SAELens' SkipTranscoder layout [d_out, d_in]
    if hasattr(sae, "b_in"):
        tensors["b_in"] = sae.b_in
    return tensors


def _weights_to_save(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in _file_tensors(sae).items()}


def save_sae(sae: SparseAutoencoder, path: str | Path, sparsity: Tensor | None = None) -> Path:
    """Write ``sae`` into folder ``path`` (created if needed); each file is written atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _saelens_cfg(sae)
    cfg[PRISMA_KEY] = {
        "format_version": FORMAT_VERSION,
        "class": type(sae).__name__ if isinstance(sae, Transcoder) else "SparseAutoencoder",
        "config": sae.cfg.to_dict(),
        "norm_scale_in": float(sae.norm_scale_in),
        "norm_scale_out": float(sae.norm_scale_out),
        "norm_fitted": sae._norm_fitted,
    }
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(_weights_to_save(sae), str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    if sparsity is not None:
        save_sparsity(folder, sparsity, d_sae=sae.d_sae)
    return folder


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


def _exact_log(t: Tensor) -> Tensor:
    """``log(t)``, nudged by an ulp where that makes ``exp`` give back ``t`` exactly (lossless round trips)."""
    lt = t.log()
    for direction in (math.inf, -math.inf):
        cand = torch.nextafter(lt, torch.full_like(lt, direction))
        lt = torch.where((lt.exp() != t) & (cand.exp() == t), cand, lt)
    return lt


def _assign(sae: SparseAutoencoder, tensors: dict[str, Tensor], file: Path) -> SparseAutoencoder:
    """Copy file tensors into ``sae`` after checking names and shapes; maps file layouts to ours."""
    expected = {k: tuple(v.shape) for k, v in _file_tensors(sae).items()}
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(
                f"{file}: missing tensor {key!r} for a {sae.cfg.architecture} SAE (found {sorted(tensors)})."
            )
        got = tuple(tensors[key].shape)
        if key == "threshold" and sae.cfg.architecture in BATCH_TOPK_FAMILY and got == ():
            continue
        if got != shape:
            raise ValueError(
                f"{file}: tensor {key!r} has shape {list(got)}, expected {list(shape)} "
                f"(d_in={sae.d_in}, d_sae={sae.d_sae}, d_out={sae.d_out}); the config and the weights disagree."
            )
    with torch.no_grad():
        for key in expected:
            value = tensors[key].to(sae.W_dec.device)
            if key == "threshold":
                if sae.cfg.architecture == "jumprelu":
                    sae.log_threshold.copy_(_exact_log(value.to(sae.log_threshold.dtype)))
                else:
                    if value.ndim and not bool((value == value[0]).all()):
                        raise ValueError(
                            f"{file}: a {sae.cfg.architecture} SAE shares one threshold across features, but "
                            "'threshold' varies; load it as architecture 'jumprelu' instead."
                        )
                    sae.running_threshold.copy_(value.reshape(-1)[0])
            elif key == "W_skip":
                sae.W_skip.copy_(value.t())
            else:
                getattr(sae, key).copy_(value)
    return sae


def _build(cfg: SAEConfig, file: Path) -> SparseAutoencoder:
    try:
        return Transcoder(cfg) if isinstance(cfg, TranscoderConfig) else SparseAutoencoder(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: invalid SAE configuration: {err}") from err


def _config_from_saelens(raw: dict[str, Any], file: Path, overrides: dict[str, Any]) -> SAEConfig:
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    arch_name = raw.get("architecture") or ("topk" if raw.get("activation_fn_str") == "topk" else "standard")
    if arch_name not in _FROM_SAELENS_ARCH:
        raise ValueError(
            f"{file}: field 'architecture'={arch_name!r} is not supported; known: {sorted(_FROM_SAELENS_ARCH)}."
        )
    arch, is_transcoder = _FROM_SAELENS_ARCH[arch_name]
    norm = raw.get("normalize_activations")
    if norm not in _FROM_SAELENS_NORM:
        raise ValueError(
            f"{file}: field 'normalize_activations'={norm!r} is not supported (none, expected_average_only_in, "
            "layer_norm)."
        )
    kwargs: dict[str, Any] = {
        "d_in": _int_field(raw, "d_in", file),
        "d_sae": _int_field(raw, "d_sae", file),
        "architecture": arch,
        "normalize_activations": _FROM_SAELENS_NORM[norm],
        "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)) and not is_transcoder,
        "hook_name": raw.get("hook_name") or meta.get("hook_name") or "",
        "hook_name_out": raw.get("hook_name_out") or meta.get("hook_name_out"),
        "model_name": raw.get("model_name") or meta.get("model_name") or "",
        "context_size": raw.get("context_size") or meta.get("context_size"),
        "dtype": str(raw.get("dtype") or "float32").removeprefix("torch."),
        "device": raw.get("device") or "cpu",
    }
    if arch == "topk":
        k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise ValueError(f"{file}: a topk SAE needs field 'k' (or activation_fn_kwargs.k).")
        kwargs["k"] = int(k)
    if arch == "batchtopk":
        kwargs["k"] = max(1, round(float(raw.get("k", 1))))
    kwargs.update(overrides)
    try:
        if is_transcoder:
            return TranscoderConfig(
                **kwargs, d_out=_int_field(raw, "d_out", file), skip_connection=arch_name == "skip_transcoder"
            )
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
        cfg = _config_from_saelens(raw, cfg_file, {"device": "cpu", **overrides})
        return _assign(_build(cfg, cfg_file), tensors, folder / WEIGHTS_FILE)
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise ValueError(f"{cfg_file}: field {PRISMA_KEY!r} must be an object with a 'config' object.")
    config_cls = TranscoderConfig if block.get("class") == "Transcoder" else SAEConfig
    stored = block["config"]
    if "device" not in overrides and not _device_available(str(stored.get("device", "cpu"))):
        overrides = {**overrides, "device": "cpu"}  # trained on an accelerator this machine lacks
    try:
        cfg = config_cls.from_dict({**stored, **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: field '{PRISMA_KEY}.config': {err}") from err
    sae = _assign(_build(cfg, cfg_file), tensors, folder / WEIGHTS_FILE)
    with torch.no_grad():
        sae.norm_scale_in.fill_(float(block.get("norm_scale_in", 1.0)))
        sae.norm_scale_out.fill_(float(block.get("norm_scale_out", 1.0)))
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
    arch = {"gated": "gated", "jumprelu": "jumprelu"}.get(raw.get("architecture") or "standard")
    if arch is None:
        if act not in ("relu", "topk"):
            raise ValueError(f"{file}: field 'activation_fn_str'={act!r} is not supported (relu, topk).")
        arch = act
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
    if arch == "topk":
        kwargs["k"] = int(_require(raw.get("activation_fn_kwargs") or {}, "k", file))
    if isinstance(raw.get("l1_coefficient"), (int, float)):
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


def _torch_load_tensors(file: Path) -> dict[str, Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for disallowed globals, RuntimeError for corrupt archives
        raise ValueError(
            f"{file} could not be read as plain tensors: torch.load(weights_only=True) refused it ({err}). "
            "prisma-lightning never unpickles arbitrary objects; re-save the file as a dict of tensors."
        ) from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(
            f"{file}: expected a dict of tensors (optionally under 'state_dict'), got {type(data).__name__}."
        )
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


def _load_vit_prisma(weights: Path, overrides: dict[str, Any]) -> SparseAutoencoder:
    cfg_file = weights.parent / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{weights} needs its ViT-Prisma config.json beside it ({cfg_file} is missing).")
    cfg = _config_from_vit_prisma(_read_json(cfg_file), cfg_file, overrides)
    tensors = _torch_load_tensors(weights)
    if isinstance(cfg, TranscoderConfig):
        tensors = dict(tensors)
        if "b_dec_out" not in tensors:
            raise ValueError(f"{weights}: missing tensor 'b_dec_out' for a ViT-Prisma transcoder.")
        tensors["b_in"] = tensors.pop("b_dec", None)
        tensors["b_dec"] = tensors.pop("b_dec_out")
        tensors = {k: v for k, v in tensors.items() if v is not None}
    sae = _assign(_build(cfg, cfg_file), tensors, weights)
    return sae


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
    try:
        hub_download(repo_id, SPARSITY_FILE, revision=revision, subfolder=subfolder)
    except FileNotFoundError:
        pass  # sparsity.safetensors is optional
    return load_sae(Path(cfg_path).parent, device=device, expected=expected)


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
