"""``features.jsonl``: one JSON object per feature, in a schema close to Neuronpedia's feature export.

:data:`FEATURE_SCHEMA` is the schema as a JSON Schema (draft 2020-12) dictionary; :func:`validate_feature`
checks a record against it without any dependency (the subset of JSON Schema the schema uses: ``type``,
``properties``, ``required``, ``additionalProperties``, ``items``, ``minimum``, ``maximum``).
The fields are documented in the package docstring (``prisma_lightning.atlas``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prisma_lightning.atlas.data import AtlasData
from prisma_lightning.utils import atomic_path

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}

ACTIVATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "imageIndex",
        "sourceIndex",
        "image",
        "label",
        "labelName",
        "maxValue",
        "maxValueTokenIndex",
        "values",
        "factors",
    ],  # fmt: skip
    "additionalProperties": False,
    "properties": {
        "imageIndex": {"type": "integer", "minimum": 0},
        "sourceIndex": {"type": ["integer", "null"]},
        "image": {"type": ["string", "null"]},
        "label": {"type": ["integer", "null"]},
        "labelName": {"type": ["string", "null"]},
        "maxValue": _NUM,
        "maxValueTokenIndex": {"type": ["integer", "null"]},
        "values": {"type": "array", "items": _NUM},
        "factors": {"type": ["object", "null"]},
    },
}

FEATURE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "prisma-lightning feature atlas record",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "modelId",
        "layer",
        "index",
        "sae",
        "tokens",
        "frac_nonzero",
        "frac_images",
        "maxActApprox",
        "mean_act_firing",
        "mean_act",
        "freq_hist_data_bar_heights",
        "freq_hist_data_bar_values",
        "label_purity",
        "label_distribution",
        "topkCosSimIndices",
        "topkCosSimValues",
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "patch_grid",
        "activations",
    ],  # fmt: skip
    "properties": {
        "modelId": _STR,
        "layer": _STR,
        "index": {"type": "integer", "minimum": 0},
        "sae": _STR,
        "tokens": _STR,
        "frac_nonzero": _FRACTION,
        "frac_images": _FRACTION,
        "maxActApprox": _NUM,
        "mean_act_firing": {"type": ["number", "null"]},
        "mean_act": _NUM,
        "freq_hist_data_bar_heights": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "freq_hist_data_bar_values": {"type": "array", "items": _NUM},
        "label_purity": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "label_distribution": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["label", "name", "count"],
                "additionalProperties": False,
                "properties": {"label": _INT, "name": _STR, "count": {"type": "integer", "minimum": 1}},
            },
        },
        "topkCosSimIndices": {"type": "array", "items": _INT},
        "topkCosSimValues": {"type": "array", "items": _NUM},
        "pos_str": {"type": "array", "items": _STR},
        "pos_values": {"type": "array", "items": _NUM},
        "neg_str": {"type": "array", "items": _STR},
        "neg_values": {"type": "array", "items": _NUM},
        "patch_grid": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "activations": {"type": "array", "items": ACTIVATION_SCHEMA},
    },
}


# ---------------------------------------------------------------------------------------------- validation
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "number" and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, _TYPES[name])


def validate_feature(record: Any, schema: dict[str, Any] = FEATURE_SCHEMA, path: str = "$") -> list[str]:
    """Errors of ``record`` against ``schema`` (empty when it validates), each naming the offending path."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(record, n) for n in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(record).__name__} {record!r:.60}"]
    if isinstance(record, int | float) and not isinstance(record, bool):
        if "minimum" in schema and record < schema["minimum"]:
            errors.append(f"{path}: {record} is below the minimum {schema['minimum']}")
        if "maximum" in schema and record > schema["maximum"]:
            errors.append(f"{path}: {record} is above the maximum {schema['maximum']}")
    if isinstance(record, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in record:
                errors.append(f"{path}: missing required field {key!r}")
        for key, value in record.items():
            if key in props:
                errors += validate_feature(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected field {key!r}")
    if isinstance(record, list) and "items" in schema:
        for i, item in enumerate(record):
            errors += validate_feature(item, schema["items"], f"{path}[{i}]")
    return errors


# ---------------------------------------------------------------------------------------------- records
def _round(x: float, digits: int = 6) -> float | None:
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def feature_records(data: AtlasData) -> Iterator[dict[str, Any]]:
    """The ``features.jsonl`` record of every feature, in feature order."""
    meta = data.meta
    grid = list(meta["patch_grid"])
    edges = data.hist_edges
    centres = [_round(math.sqrt(float(edges[i]) * float(edges[i + 1]))) for i in range(len(edges) - 1)]
    counts = data.label_counts()
    purity = data.purity(counts)
    summary = {key: value.tolist() for key, value in data.summary.items()}
    hist = data.hist.tolist()
    scores, ids, labels = data.top_scores.tolist(), data.top_ids.tolist(), data.top_labels.tolist()
    maps = data.top_maps
    classes = data.top_classes.tolist() if data.top_classes is not None else None
    nn_idx, nn_cos = (data.neighbours[0].tolist(), data.neighbours[1].tolist()) if data.neighbours else (None, None)
    text = data.text
    if text is not None:
        names = text["names"]
        pos_i, pos_v = (t.tolist() for t in text["pos"])
        neg_i, neg_v = (t.tolist() for t in text["neg"])
    for f in range(data.d_sae):
        acts = []
        for j, image_id in enumerate(ids[f]):
            if image_id < 0:
                continue
            score = scores[f][j]
            patch = maps[f, j].tolist()
            values = [_round(q / 255.0 * score, 4) for q in patch]
            top_patch = patch.index(255) if 255 in patch else None
            factors = None
            if classes is not None and data.factors is not None:
                factors = {name: int(classes[f][j][i]) for i, name in enumerate(data.factors.names)}
            label = labels[f][j]
            acts.append({
                "imageIndex": int(image_id),
                "sourceIndex": data.source_index(image_id),
                "image": data.image_files.get(int(image_id)),
                "label": label if label >= 0 else None,
                "labelName": data.label_name(label),
                "maxValue": _round(score),
                "maxValueTokenIndex": top_patch,
                "values": values,
                "factors": factors,
            })  # fmt: skip
        record = {
            "modelId": str(meta.get("modelId", "")),
            "layer": str(meta.get("layer", "")),
            "index": f,
            "sae": str(meta.get("sae", "")),
            "tokens": str(meta.get("tokens", "")),
            "frac_nonzero": _round(summary["frac_nonzero"][f]),
            "frac_images": _round(summary["frac_images"][f]),
            "maxActApprox": _round(summary["max"][f]),
            "mean_act_firing": _round(summary["mean_firing"][f]),
            "mean_act": _round(summary["mean_all"][f]),
            "freq_hist_data_bar_heights": hist[f],
            "freq_hist_data_bar_values": centres,
            "label_purity": _round(purity[f]) if purity[f] is not None else None,
            "label_distribution": [{"label": lab, "name": data.label_name(lab), "count": n} for lab, n in counts[f]],
            "topkCosSimIndices": nn_idx[f] if nn_idx is not None else [],
            "topkCosSimValues": [_round(v) for v in nn_cos[f]] if nn_cos is not None else [],
            "pos_str": [names[i] for i in pos_i[f]] if text is not None else [],
            "pos_values": [_round(v) for v in pos_v[f]] if text is not None else [],
            "neg_str": [names[i] for i in neg_i[f]] if text is not None else [],
            "neg_values": [_round(v) for v in neg_v[f]] if text is not None else [],
            "patch_grid": grid,
            "activations": acts,
        }
        yield record


def write_jsonl(data: AtlasData, path: str | Path) -> Path:
    """Write ``features.jsonl`` atomically (one compact ASCII JSON object per line, in feature order)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for record in feature_records(data):
            # ASCII: names may hold U+2028 or U+0085, which some line readers (str.splitlines) split on.
            out.write(json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False))
            out.write("\n")
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path
