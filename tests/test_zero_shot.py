"""ZeroShotClassifier: text-tower class embeddings checked against the source libraries, files, package data, errors.

Everything is offline and random-weight. Tokenizers: the HF CLIP tests use a real ``CLIPTokenizer`` built from a
tiny byte-level vocab + merges written to a temporary folder; the open_clip tests use open_clip's own BPE tokenizer
(``open_clip.get_tokenizer("ViT-B-32")``, whose vocab ships inside the package); the SigLIP test uses a small
character-level callable defined here that returns ``input_ids`` / ``attention_mask`` tensors.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from prisma_lightning.backbones.zero_shot import ZeroShotClassifier, clip_templates, imagenet_class_names

CLASS_NAMES = ["cat", "dog", "the bird", "red fox", "tench"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{}"]
D_EMBED = 16


# ----------------------------------------------------------------------------------------------------------------------
# Tiny source models and tokenizers
# ----------------------------------------------------------------------------------------------------------------------


def _pooled(out: torch.Tensor | object) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4.x and a ModelOutput with ``pooler_output`` in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """A real HF CLIPTokenizer over a byte-level vocab (256 bytes, their word-final forms, 2 merges, 2 specials)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def hf_clip(clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    n_vocab = len(clip_tokenizer)
    text = dict(
        vocab_size=n_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    config = CLIPConfig(text_config=text, vision_config=dict(vision, patch_size=8), projection_dim=D_EMBED)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))  # not the init value, so a missing exp() or a default shows
    return model


@pytest.fixture(scope="module")
def oc_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=D_EMBED, vision_cfg=vision, text_cfg=text).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    return model


@pytest.fixture(scope="module")
def oc_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")  # SimpleTokenizer: its BPE vocab ships with open_clip (offline)


SIGLIP_VOCAB, SIGLIP_LEN = 128, 24


def char_tokenizer(texts: list[str]) -> dict[str, torch.Tensor]:
    """Character ids padded with 1 to SIGLIP_LEN (SigLIP's 'max_length' padding), plus an attention mask."""
    ids = torch.ones(len(texts), SIGLIP_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        codes = [2 + ord(c) % (SIGLIP_VOCAB - 2) for c in text[:SIGLIP_LEN]]
        ids[row, : len(codes)] = torch.tensor(codes)
        mask[row, : len(codes)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def hf_siglip():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(2)
    common = dict(hidden_size=D_EMBED, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(common, vocab_size=SIGLIP_VOCAB, max_position_embeddings=SIGLIP_LEN)
    config = SiglipConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8))
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-3.5)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference computations, written directly with the source libraries' calls
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_weights(embed_prompts, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """One class at a time: embed its prompts, normalise each, average, renormalise -> [d, n_classes]."""
    columns = []
    for name in class_names:
        emb = embed_prompts([t.format(name) for t in templates]).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def hf_clip_text(model, tokenizer):
    return lambda texts: _pooled(model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")))


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face CLIP
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [2, 256])  # 2: several forwards per class; 256: several classes per forward
def test_hf_clip_matches_reference(hf_clip, clip_tokenizer, batch_size):
    clf = ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, CLASS_NAMES, TEMPLATES, batch_size=batch_size)
    expected = reference_weights(hf_clip_text(hf_clip, clip_tokenizer), CLASS_NAMES, TEMPLATES)

    assert clf.weights.shape == (D_EMBED, len(CLASS_NAMES)) and clf.weights.dtype == torch.float32
    assert_close(clf.weights, expected)
    assert_close(clf.weights.norm(dim=0), torch.ones(len(CLASS_NAMES)))
    assert_close(clf.logit_scale, torch.tensor(42.0))
    assert clf.logit_bias is None
    assert clf.class_names == CLASS_NAMES and clf.templates == TEMPLATES

    with torch.no_grad():
        image_emb = _pooled(hf_clip.get_image_features(pixel_values=torch.randn(3, 3, 32, 32)))
        img = image_emb / image_emb.norm(dim=-1, keepdim=True)
        assert_close(clf(image_emb), hf_clip.logit_scale.exp() * img @ expected)
        assert_close(clf.logits(image_emb[None]), clf(image_emb)[None])  # any leading dims


def test_hf_clip_single_template_equals_model_logits(hf_clip, clip_tokenizer):
    """With one template the classifier must reproduce CLIPModel's own logits_per_image."""
    template = "a photo of a {}."
    clf = ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, CLASS_NAMES, [template])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = clip_tokenizer([template.format(n) for n in CLASS_NAMES], padding=True, return_tensors="pt")
        expected = hf_clip(**text, pixel_values=pixels).logits_per_image
        got = clf(_pooled(hf_clip.get_image_features(pixel_values=pixels)))
    assert_close(got, expected)


def test_defaults_use_imagenet_and_restore_train_mode(hf_clip, clip_tokenizer):
    hf_clip.train()
    try:
        clf = ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, templates=["{}"], batch_size=500)
        assert hf_clip.training, "from_clip must restore the model's train/eval state"
    finally:
        hf_clip.eval()
    assert clf.class_names == imagenet_class_names() and clf.weights.shape == (D_EMBED, 1000)
    expected = reference_weights(hf_clip_text(hf_clip, clip_tokenizer), imagenet_class_names()[:7], ["{}"])
    assert_close(clf.weights[:, :7], expected)
    assert_close(clf.weights.norm(dim=0), torch.ones(1000))


# ----------------------------------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------------------------------


def test_open_clip_matches_reference(oc_clip, oc_tokenizer):
    clf = ZeroShotClassifier.from_clip(oc_clip, oc_tokenizer, CLASS_NAMES, TEMPLATES, batch_size=4)
    expected = reference_weights(lambda texts: oc_clip.encode_text(oc_tokenizer(texts)), CLASS_NAMES, TEMPLATES)
    assert_close(clf.weights, expected)
    assert_close(clf.logit_scale, torch.tensor(30.0))
    assert clf.logit_bias is None

    with torch.no_grad():
        image_emb = oc_clip.encode_image(torch.randn(3, 3, 32, 32))
        assert clf(torch.randn(0, D_EMBED)).shape == (0, len(CLASS_NAMES))  # an empty batch works too
        img = image_emb / image_emb.norm(dim=-1, keepdim=True)
        assert_close(clf(image_emb), oc_clip.logit_scale.exp() * img @ expected)


def test_open_clip_default_templates_and_bias(oc_tokenizer):
    """The 80 default templates, and an open_clip model with a SigLIP-style logit bias."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=D_EMBED, vision_cfg=vision, text_cfg=text, init_logit_bias=-2.0).eval()
    names = CLASS_NAMES[:2]
    clf = ZeroShotClassifier.from_clip(model, oc_tokenizer, names)
    assert clf.templates == clip_templates()
    expected = reference_weights(lambda texts: model.encode_text(oc_tokenizer(texts)), names, clip_templates())
    assert_close(clf.weights, expected)
    assert_close(clf.logit_bias, torch.tensor(-2.0))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), oc_tokenizer([clip_templates()[0].format(n) for n in names]))
    image_features, scale, bias = out[0], out[2], out[3]
    assert_close(clf(image_features), scale * image_features @ expected + bias)


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face SigLIP
# ----------------------------------------------------------------------------------------------------------------------


def test_siglip_matches_model_logits(hf_siglip):
    """Single template: equals SiglipModel's logits_per_image (scale.exp() and bias, ids only, no attention mask)."""
    template = "a photo of a {}."
    clf = ZeroShotClassifier.from_clip(hf_siglip, char_tokenizer, CLASS_NAMES, [template])
    assert_close(clf.logit_scale, torch.tensor(10.0))
    assert_close(clf.logit_bias, torch.tensor(-3.5))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ids = char_tokenizer([template.format(n) for n in CLASS_NAMES])["input_ids"]
        expected = hf_siglip(input_ids=ids, pixel_values=pixels).logits_per_image
        got = clf(_pooled(hf_siglip.get_image_features(pixel_values=pixels)))
    assert_close(got, expected)

    multi = ZeroShotClassifier.from_clip(hf_siglip, char_tokenizer, CLASS_NAMES, TEMPLATES)
    embed = lambda texts: _pooled(hf_siglip.get_text_features(input_ids=char_tokenizer(texts)["input_ids"]))  # noqa: E731
    assert_close(multi.weights, reference_weights(embed, CLASS_NAMES, TEMPLATES))


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, -1.25])
def test_save_load_round_trip(tmp_path, bias):
    weights = torch.nn.functional.normalize(torch.randn(D_EMBED, 4), dim=0)
    names = ["ß-ray", "dog", "dog", 'a "quoted" {name}']  # non-ASCII, duplicates and JSON-special characters
    clf = ZeroShotClassifier(weights, 57.3, bias, class_names=names, templates=TEMPLATES)
    path = clf.save(tmp_path / "sub" / "zs.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["zs.safetensors"]  # no temp file left behind

    loaded = ZeroShotClassifier.load(path)
    assert torch.equal(loaded.weights, clf.weights) and torch.equal(loaded.logit_scale, clf.logit_scale)
    assert (loaded.logit_bias is None) == (bias is None)
    if bias is not None:
        assert torch.equal(loaded.logit_bias, clf.logit_bias)
    assert loaded.class_names == names and loaded.templates == TEMPLATES
    x = torch.randn(5, D_EMBED)
    assert torch.equal(loaded(x), clf(x))
    assert set(loaded.state_dict()) == {"weights", "logit_scale"} | (set() if bias is None else {"logit_bias"})


def test_load_refuses_pickle_and_reports_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ZeroShotClassifier.load(tmp_path / "missing.safetensors")

    pickled = tmp_path / "classifier.pt"
    torch.save({"weights": torch.randn(4, 2), "logit_scale": torch.tensor(100.0)}, pickled)
    with pytest.raises(ValueError, match=r"classifier\.pt.*pickle"):
        ZeroShotClassifier.load(pickled)

    no_scale = tmp_path / "no_scale.safetensors"
    save_file({"weights": torch.randn(4, 2)}, str(no_scale), metadata={"class_names": '["a", "b"]'})
    with pytest.raises(ValueError, match=r"no_scale\.safetensors has no 'logit_scale' tensor"):
        ZeroShotClassifier.load(no_scale)

    no_names = tmp_path / "no_names.safetensors"
    save_file({"weights": torch.randn(4, 2), "logit_scale": torch.tensor(1.0)}, str(no_names))
    with pytest.raises(ValueError, match=r"no_names\.safetensors has no 'class_names'"):
        ZeroShotClassifier.load(no_names)

    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"weights": torch.randn(4, 2), "logit_scale": torch.tensor(1.0)}, str(bad_json), {"class_names": "[a"})
    with pytest.raises(ValueError, match=r"'class_names' metadata entry of .*bad_json\.safetensors"):
        ZeroShotClassifier.load(bad_json)

    wrong_count = tmp_path / "wrong_count.safetensors"
    tensors = {"weights": torch.randn(4, 2), "logit_scale": torch.tensor(1.0)}
    save_file(tensors, str(wrong_count), metadata={"class_names": '["only one"]'})
    with pytest.raises(ValueError, match=r"wrong_count\.safetensors.*1 class names for weights with 2 columns"):
        ZeroShotClassifier.load(wrong_count)

    with pytest.raises(IsADirectoryError, match="one file"):
        ZeroShotClassifier(torch.randn(4, 2)).save(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Package data
# ----------------------------------------------------------------------------------------------------------------------


def test_package_metadata_matches_open_clip():
    from open_clip import zero_shot_metadata

    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet paper"
    # OpenAI's curated list (kept verbatim) names two pairs of ImageNet classes identically.
    duplicates = {name: count for name, count in Counter(names).items() if count > 1}
    assert duplicates == {"missile": 2, "sunglasses": 2} and len(set(names)) == 998
    assert names == list(zero_shot_metadata.IMAGENET_CLASSNAMES)

    templates = clip_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)
    assert templates == [t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    names.append("mutated")  # callers get a copy; the cached data is unaffected
    assert len(imagenet_class_names()) == 1000


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


def test_input_errors(hf_clip, clip_tokenizer):
    with pytest.raises(ValueError, match="class_names is empty"):
        ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, [], TEMPLATES)
    with pytest.raises(TypeError, match="Wrap a single name in a list"):
        ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, "cat", TEMPLATES)
    with pytest.raises(ValueError, match=r"templates\[1\] = 'a photo' has no '\{\}'"):
        ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, CLASS_NAMES, ["{}", "a photo"])
    with pytest.raises(ValueError, match="templates is empty"):
        ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, CLASS_NAMES, [])
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        ZeroShotClassifier.from_clip(hf_clip, clip_tokenizer, CLASS_NAMES, TEMPLATES, batch_size=0)
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*transformers\.CLIPModel.*open_clip"):
        ZeroShotClassifier.from_clip(nn.Linear(2, 2), clip_tokenizer, CLASS_NAMES)
    with pytest.raises(TypeError, match="expected a LongTensor"):
        ZeroShotClassifier.from_clip(hf_clip, lambda texts: texts, CLASS_NAMES, TEMPLATES)

    clf = ZeroShotClassifier(torch.randn(D_EMBED, 3), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"width 7 .*expects d_embed = 16"):
        clf.logits(torch.randn(2, 7))
    with pytest.raises(ValueError, match="2 class names for weights with 3 columns"):
        ZeroShotClassifier(torch.randn(D_EMBED, 3), class_names=["a", "b"])
    with pytest.raises(ValueError, match="2-D tensor"):
        ZeroShotClassifier(torch.randn(D_EMBED))
