"""SAELens and ViT-Prisma interop, both directions, against files their own code wrote.

* We read theirs: every fixture in ``tests/fixtures/saelens`` and ``tests/fixtures/vit_prisma`` (made by each
  library's own save path, see the generating scripts there) loads and reproduces the library's own ``feats`` and
  ``recon``.
* They read ours: every folder we write is read with ``saelens_reader`` (SAELens 6.54's loader restated field by
  field) and gives our outputs; the same restatement reproduces the SAELens fixtures, which pins it to SAELens.
* A ViT-Prisma checkpoint carrying a malicious pickled object loads without running it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from saelens_reader import NotLoadable, load_from_disk
from safetensors.torch import load_file
from torch.testing import assert_close

from prisma_lightning.sae import SAEConfig, SparseAutoencoder, TranscoderConfig, architecture_names, config_class

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAELENS = FIXTURES / "saelens"
PRISMA = FIXTURES / "vit_prisma"
SAELENS_CASES = sorted(p.name for p in SAELENS.iterdir() if (p / "cfg.json").is_file())
PRISMA_CASES = ["relu", "topk", "gated", "transcoder"]
ATOL = 2e-5


def expected(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.expected.safetensors"))


def our_outputs(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sae.eval()
    with torch.no_grad():
        if sae.is_transcoder:
            out = sae(x, torch.zeros(x.shape[0], sae.d_out))
        else:
            out = sae(x)
    return out.feats, out.recon


# ---------------------------------------------------------------------------------------------------- theirs -> us
@pytest.mark.parametrize("name", SAELENS_CASES)
def test_saelens_fixture_loads_with_saelens_outputs(name: str) -> None:
    exp = expected(SAELENS, name)
    sae = SparseAutoencoder.load(SAELENS / name)
    feats, recon = our_outputs(sae, exp["x"])
    # SAELens cannot load BatchTopK training checkpoints for inference; its own conversion (a JumpReLU with the
    # shared threshold, decoder norms folded) is what a user gets from them.
    suffix = "_inference" if "feats_inference" in exp else ""
    assert_close(feats, exp["feats" + suffix], atol=ATOL, rtol=1e-5)
    assert_close(recon, exp["recon" + suffix], atol=ATOL, rtol=1e-5)
    assert 0 < (feats > 0).float().mean() < 0.5  # the fixture exercises real sparsity, not all-zero features


def test_saelens_metadata_and_training_fields_are_read() -> None:
    sae = SparseAutoencoder.load(SAELENS / "topk_training_checkpoint")
    assert sae.cfg.hook_name == "blocks.0.hook_resid_post" and sae.cfg.model_name == "test/vit-tiny"
    assert sae.cfg.k == 4 and sae.cfg.architecture == "topk"
    matryoshka = SparseAutoencoder.load(SAELENS / "matryoshka_batchtopk_training_checkpoint")
    assert matryoshka.cfg.architecture == "matryoshka_batchtopk" and matryoshka.cfg.matryoshka_prefixes == [8, 24, 64]
    skip = SparseAutoencoder.load(SAELENS / "skip_transcoder")
    assert skip.is_transcoder and skip.cfg.skip_connection and skip.d_out == 24


def test_skip_transcoder_decode_has_no_skip_term_like_saelens() -> None:
    exp = expected(SAELENS, "skip_transcoder")
    tc = SparseAutoencoder.load(SAELENS / "skip_transcoder").eval()
    with torch.no_grad():
        assert_close(tc.decode(tc.encode(exp["x"])), exp["decode_only"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", PRISMA_CASES)
def test_vit_prisma_trainer_checkpoint_loads_with_its_outputs(name: str) -> None:
    exp = expected(PRISMA, name)
    sae = SparseAutoencoder.load(PRISMA / name)  # n_images_*.pt pickles ViT-Prisma's runner config
    feats, recon = our_outputs(sae, exp["x"])
    assert_close(feats, exp["feats"], atol=ATOL, rtol=1e-5)
    assert_close(recon, exp["recon"], atol=ATOL, rtol=1e-5)


def test_malicious_vit_prisma_checkpoint_runs_nothing() -> None:
    marker = Path("/tmp/prisma_lightning_pwned_marker")  # what the fixture's pickled __reduce__ would create
    marker.unlink(missing_ok=True)
    sae = SparseAutoencoder.load(PRISMA / "malicious")
    assert not marker.exists(), "a pickled object was executed"
    reference = SparseAutoencoder.load(PRISMA / "relu")
    assert_close(sae.W_enc, reference.W_enc)  # the tensors are recovered all the same


# ---------------------------------------------------------------------------------------------------- us -> theirs
@pytest.mark.parametrize("name", SAELENS_CASES)
def test_the_restated_saelens_loader_reproduces_saelens(name: str) -> None:
    """The reader below is trusted because it gives SAELens's own outputs on SAELens's own folders."""
    exp = expected(SAELENS, name)
    try:
        theirs = load_from_disk(SAELENS / name)
    except NotLoadable:
        assert "feats_inference" in exp  # SAELens refuses its BatchTopK training checkpoints too
        return
    feats, out = theirs.forward(exp["x"])
    assert_close(feats, exp["feats"], atol=ATOL, rtol=1e-5)
    assert_close(out, exp["recon"], atol=ATOL, rtol=1e-5)


def randomized(sae: SparseAutoencoder, seed: int = 0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.log(0.2 + 0.3 * torch.rand(p.shape, generator=gen)))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen))
        if hasattr(sae, "running_threshold"):
            sae.running_threshold.fill_(0.3)
    return sae


def make(arch: str, transcoder: bool = False, **kw) -> SparseAutoencoder:
    fields = {f.name for f in dataclasses.fields(config_class(arch))}
    if "k" in fields:
        kw.setdefault("k", 6)
    base = dict(d_in=16, d_sae=64, architecture=arch, hook_name="blocks.3.hook_resid_post", model_name="m", **kw)
    cfg = TranscoderConfig(**base, d_out=12, hook_name_out="blocks.3.hook_mlp_out") if transcoder else SAEConfig(**base)
    return randomized(SparseAutoencoder(cfg))


SAELENS_WRITABLE = [a for a in architecture_names() if a in ("relu", "topk", "batchtopk", "jumprelu", "gated",
                                                                     "matryoshka_batchtopk")]  # fmt: skip


@pytest.mark.parametrize("norm", ["none", "expected_norm", "layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("arch", SAELENS_WRITABLE)
def test_saelens_reads_our_folders_like_we_do(arch: str, norm: str, tmp_path: Path) -> None:
    sae = make(arch, normalize_activations=norm)
    x = 6 * torch.randn(48, 16) + 1
    if norm == "expected_norm":
        sae.fit_normalization(x)
    sae.save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    assert raw["metadata"]["sae_lens_version"] >= "6" and raw["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    theirs = load_from_disk(tmp_path)
    feats, recon = our_outputs(sae, x)
    their_feats, their_recon = theirs.forward(x)
    assert_close(their_recon, recon, atol=1e-4, rtol=1e-4)
    if norm == "expected_norm":  # folded: the features are the same up to float rounding
        assert_close(their_feats, feats, atol=1e-4, rtol=1e-4)
    else:
        assert_close(their_feats, feats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("arch", "skip"), [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)])
def test_saelens_reads_our_transcoders(arch: str, skip: bool, tmp_path: Path) -> None:
    tc = make(arch, transcoder=True, skip_connection=skip, apply_b_dec_to_input=True)  # input bias folded on save
    x = torch.randn(40, 16)
    tc.save(tmp_path)
    theirs = load_from_disk(tmp_path)
    assert theirs.cfg["d_out"] == 12 and theirs.cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    feats, recon = our_outputs(tc, x)
    their_feats, their_out = theirs.forward(x)
    assert_close(their_feats, feats, atol=1e-5, rtol=1e-5)
    assert_close(their_out, recon, atol=1e-5, rtol=1e-5)
    again = SparseAutoencoder.load(tmp_path)  # and we read our own transcoder file back to the same function
    assert_close(our_outputs(again, x)[1], recon, atol=1e-5, rtol=1e-5)


def test_a_pre_6_reader_would_misread_a_folder_without_version(tmp_path: Path) -> None:
    """Why the writer puts ``sae_lens_version`` into ``metadata``: without it SAELens converts the file as pre-6.0."""
    sae = make("jumprelu")
    sae.save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    del raw["metadata"]["sae_lens_version"]
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(NotLoadable, match="pre-6.0"):
        load_from_disk(tmp_path)
