"""The static, offline site of an atlas: ``index.html``, ``feature.html#<i>``, ``ground_truth.html``.

Layout of the output folder::

    index.html            every feature in a sortable, searchable, paginated table (100 rows per page)
    feature.html#<i>      one feature: top images with patch heatmaps, histogram, labels, factors, neighbours
    ground_truth.html     per factor value, the best feature and its AUROC (when the data has factors)
    assets/atlas.css, assets/atlas.js
    data/index.js         column arrays of the table (window.ATLAS_INDEX)
    data/meta.js          settings shared by the pages (window.ATLAS_META)
    data/features_NNNNN.js  ``chunk_size`` features each, loaded on demand by feature.html
    data/ground_truth.js
    images/<image id>.png each top image once (image id = index in the predict dataset)

Data files are JavaScript (``window.X = {...};``) so the pages work from ``file://`` (browsers block
``fetch()`` of local files). Every value is JSON-encoded with ``<``, ``>`` and ``&`` escaped (``\\u003c``), and
the pages insert data as text, never as HTML. Every file is written atomically.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prisma_lightning.atlas import assets
from prisma_lightning.atlas.data import AtlasData
from prisma_lightning.utils import atomic_path

ImageLoader = Callable[[list[int]], Tensor]
"""Image ids -> display images ``[n, C, H, W]`` in [0, 1]."""


def js_json(obj: Any) -> str:
    """JSON safe to embed in ``<script>``: ASCII only, with ``<``, ``>`` and ``&`` written as ``\\u003c`` etc."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _num(x: float | None, digits: int = 4) -> float | None:
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_js(path: Path, name: str, obj: Any) -> None:
    _write_text(path, f"window.{name} = {js_json(obj)};\n")


# ---------------------------------------------------------------------------------------------- images
def png_bytes(image: Tensor, max_side: int = 128) -> bytes:
    """``[C, H, W]`` in [0, 1] or uint8 (C = 1 or 3; other counts show the first channel) -> PNG bytes, downscaled
    so that the longer side is at most ``max_side`` (never upscaled; pages scale small images without smoothing)."""
    from PIL import Image

    x = image if image.dtype == torch.uint8 else _to_uint8(image)
    x = x.cpu()
    if x.shape[0] == 3:
        img = Image.fromarray(x.permute(1, 2, 0).numpy(), mode="RGB")
    else:
        img = Image.fromarray(x[0].numpy(), mode="L")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _to_uint8(images: Tensor) -> Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round_().to(torch.uint8)


def write_images(
    data: AtlasData, out: str | Path, loader: ImageLoader, max_side: int = 128, batch: int = 256, threads: int = 8
) -> dict[int, str]:
    """Write every top image once as ``images/<id>.png``; fills and returns ``data.image_files``.

    PNG encoding and the atomic writes (each synced to disk) run in ``threads`` threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = Path(out)
    ids = data.unique_image_ids()

    def write(image_id: int, image: Tensor) -> None:
        with atomic_path(out / f"images/{image_id}.png") as tmp:
            tmp.write_bytes(png_bytes(image, max_side))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            images = loader(part)
            if images.shape[0] != len(part):
                raise ValueError(f"The image loader returned {images.shape[0]} images for {len(part)} ids.")
            images = _to_uint8(images)  # one conversion per batch
            list(pool.map(write, part, images))  # re-raises a failed write
            data.image_files.update({image_id: f"images/{image_id}.png" for image_id in part})
    return data.image_files


# ---------------------------------------------------------------------------------------------- data files
def _meta(data: AtlasData, chunk_size: int, title: str) -> dict[str, Any]:
    m = data.meta
    return {
        "title": title,
        "modelId": str(m.get("modelId", "")),
        "layer": str(m.get("layer", "")),
        "tokens": str(m.get("tokens", "")),
        "d_sae": data.d_sae,
        "n_images": int(m.get("n_images", 0)),
        "top_k": int(m.get("top_k", data.top_ids.shape[1])),
        "chunk_size": chunk_size,
        "patch_grid": [int(g) for g in m.get("patch_grid", (1, 0, 0))],
        "hist_edges": [_num(e, 5) for e in data.hist_edges.tolist()],
        "ground_truth": data.ground_truth is not None,
        "factor_values": (
            {n: v for n, v in zip(data.factors.names, data.factors.value_names, strict=True)} if data.factors else {}
        ),
    }


def _index_data(data: AtlasData, meta: dict[str, Any], counts: list, purity: list) -> dict[str, Any]:
    s = {k: v.tolist() for k, v in data.summary.items()}
    thumbs = [row[0] if row[0] >= 0 and row[0] in data.image_files else -1 for row in data.top_ids.tolist()]
    return {
        "meta": meta,
        "freq": [_num(v) for v in s["frac_nonzero"]],
        "fimg": [_num(v) for v in s["frac_images"]],
        "max": [_num(v) for v in s["max"]],
        "mean": [_num(v) for v in s["mean_firing"]],
        "purity": [_num(v) for v in purity],
        "label": [data.label_name(c[0][0]) if c else None for c in counts],
        "thumb": thumbs,
    }


def _feature_entries(data: AtlasData, features: Iterable[int], counts: list, purity: list) -> list[dict[str, Any]]:
    s = {k: v.tolist() for k, v in data.summary.items()}
    out = []
    for f in features:
        acts = []
        for j, image_id in enumerate(data.top_ids[f].tolist()):
            if image_id < 0 or image_id not in data.image_files:
                continue
            label = int(data.top_labels[f, j])
            acts.append([image_id, _num(float(data.top_scores[f, j])), data.label_name(label),
                         data.top_maps[f, j].tolist()])  # fmt: skip
        factors = None
        if data.top_classes is not None and data.factors is not None:
            factors = {}
            for i, name in enumerate(data.factors.names):
                col = data.top_classes[f, :, i]
                col = col[col >= 0]
                factors[name] = torch.bincount(col, minlength=data.factors.sizes[i]).tolist()
        entry = {
            "i": f,
            "freq": _num(s["frac_nonzero"][f]),
            "fimg": _num(s["frac_images"][f]),
            "max": _num(s["max"][f]),
            "mean": _num(s["mean_firing"][f]),
            "meanAll": _num(s["mean_all"][f]),
            "purity": _num(purity[f]),
            "hist": data.hist[f].tolist(),
            "acts": acts,
            "labels": [[data.label_name(lab), n] for lab, n in counts[f]],
            "factors": factors,
            "nn": [],
            "pos": None,
            "neg": None,
        }
        if data.neighbours is not None:
            idx, cos = data.neighbours
            entry["nn"] = [[int(j), _num(c, 3)] for j, c in zip(idx[f].tolist(), cos[f].tolist(), strict=True)]
        if data.text is not None:
            names = data.text["names"]
            for key in ("pos", "neg"):
                idx, cos = data.text[key]
                entry[key] = [[names[j], _num(c, 3)] for j, c in zip(idx[f].tolist(), cos[f].tolist(), strict=True)]
        out.append(entry)
    return out


def _page(title: str, scripts: list[str], call: str) -> str:
    tags = [f'<script src="{html.escape(src)}"></script>' for src in scripts]
    tags.append(f"<script>{call}</script>")
    return assets.PAGE.format(title=html.escape(title), scripts="\n".join(tags))


GROUND_TRUTH_TEXT = (
    "For every value of every generative factor: the single feature whose image score (its maximum over the "
    "image's tokens) best detects the value (AUROC, 0.5 = chance), and the held-out balanced accuracy of "
    "logistic-regression probes on the top k features ranked by train mean difference. A feature is dominated "
    "by a factor when at least the threshold share of its top images have the same value of it."
)


def write_site(data: AtlasData, out: str | Path, chunk_size: int = 128, title: str | None = None) -> Path:
    """Write the pages, assets and data files into ``out`` (images must already be written); returns index.html.

    Args:
        data: the atlas.
        out: output folder.
        chunk_size: features per ``data/features_*.js`` file.
        title: page title (default: ``"<model> <layer> feature atlas"``).
    """
    out = Path(out)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    title = title or f"{data.meta.get('modelId', '')} {data.meta.get('layer', '')} feature atlas".strip()
    meta = _meta(data, chunk_size, title)
    counts = data.label_counts()
    purity = data.purity(counts)
    _write_text(out / "assets" / "atlas.css", assets.CSS)
    _write_text(out / "assets" / "atlas.js", assets.JS)
    _write_js(out / "data" / "meta.js", "ATLAS_META", meta)
    _write_js(out / "data" / "index.js", "ATLAS_INDEX", _index_data(data, meta, counts, purity))
    for c, start in enumerate(range(0, data.d_sae, chunk_size)):
        entries = _feature_entries(data, range(start, min(data.d_sae, start + chunk_size)), counts, purity)
        _write_text(out / "data" / f"features_{c:05d}.js", f"Atlas.addChunk({c}, {js_json(entries)});\n")
    js = ["assets/atlas.js"]
    if data.ground_truth is not None:
        names = (
            {n: v for n, v in zip(data.factors.names, data.factors.value_names, strict=True)} if data.factors else {}
        )
        gt = {"meta": meta, "report": data.ground_truth, "value_names": names, "description": GROUND_TRUTH_TEXT}
        _write_js(out / "data" / "ground_truth.js", "ATLAS_GROUND_TRUTH", gt)
        _write_text(out / "ground_truth.html", _page(f"Ground truth - {title}", ["data/ground_truth.js", *js],
                                                     "Atlas.groundTruth();"))  # fmt: skip
    _write_text(out / "feature.html", _page(f"Feature - {title}", ["data/meta.js", *js], "Atlas.feature();"))
    index = out / "index.html"
    _write_text(index, _page(title, ["data/index.js", *js], "Atlas.index();"))
    return index
