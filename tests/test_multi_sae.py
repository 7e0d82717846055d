"""Many SAEs from one backbone pass: sweeps and hook patterns, identical batches, per-SAE outputs and logs,
several hooks' shards in lockstep, the memory budget, and each SAE trained exactly as it would be alone."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.activations import ShardWriter
from prisma_lightning.callbacks import ActivationWriter, SAEEvaluator
from prisma_lightning.datamodules.activations import ActivationDataModule
from prisma_lightning.modules import ActivationCacheModule, SAEModule
from prisma_lightning.modules.sae_specs import expand_braces, expand_specs
from prisma_lightning.sae import SparseAutoencoder

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
TEMPLATE = {"architecture": "topk", "d_in": 32, "expansion_factor": 2, "k": 4, "b_dec_init": "mean"}


def trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    log_every_n_steps=1, accelerator="cpu", devices=1, num_sanity_val_steps=0)  # fmt: skip
    return pl.Trainer(**{**defaults, **kw})


def images(n=96, batch=8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(n, 3, 16, 16, generator=gen)
    return DataLoader(TensorDataset(data, torch.randint(0, 10, (n,), generator=gen)), batch_size=batch)


def online(**kw) -> SAEModule:
    torch.manual_seed(0)  # the random backbone weights: the same for every run of a test
    defaults = dict(backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=512, batch_tokens=128,
                    init_tokens=256, lr=3e-3)  # fmt: skip
    module = SAEModule(**{**defaults, **kw})
    module.backbone  # built now, from the seed above  # noqa: B018
    return module


# ---------------------------------------------------------------------------------------------------- expansion
def test_brace_patterns_and_sweeps_expand_to_named_saes() -> None:
    assert expand_braces("blocks.{0..2}.hook_{resid_post,mlp_out}") == [
        f"blocks.{i}.hook_{h}" for i in range(3) for h in ("resid_post", "mlp_out")
    ]
    specs, single = expand_specs(TEMPLATE, hooks="blocks.{0..11}.hook_resid_post", sweep={"k": [8, 16], "lr": [1e-4]})
    assert not single and len(specs) == 24
    assert specs[0].name == "blocks_0_resid_post__k8__lr0p0001" and specs[0].config.k == 8
    assert specs[0].training == {"lr": 1e-4} and specs[-1].config.hook_name == "blocks.11.hook_resid_post"
    entries = [{"name": "wide", "expansion_factor": 8}, {"architecture": "jumprelu", "l0_coefficient": 0.1}]
    specs, _ = expand_specs({"d_in": 32, "hook_name": H0}, saes=entries)
    assert [s.name for s in specs] == ["wide", "blocks_0_resid_post"]
    assert specs[1].config.architecture == "jumprelu" and specs[0].config.d_sae == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"sweep": {"kk": [1, 2]}},
            r"sae \(sweep \{'kk': 1\}\): Unknown TopKConfig fields 'kk' \(did you mean 'k'\?\)",
        ),
        ({"sweep": {"k": []}}, r"sweep.k must be a non-empty list"),
        ({"saes": [{"k": -1}]}, r"saes\[0\].*k must be an integer >= 1, got -1"),
        ({"saes": [{"name": "a"}, {"name": "a"}]}, r"Two SAEs are named 'a' \(saes\[0\] and saes\[1\]\)"),
        ({"hooks": "blocks.{0..1.hook"}, r"must hold a range like \{0\.\.11\}"),
        ({"saes": [{"lr": -1}]}, r"saes\[0\]: lr=-1 must be a positive finite number"),
    ],
)
def test_bad_sweeps_name_the_offending_entry(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_specs({**TEMPLATE, "hook_name": H0}, **kwargs)


def test_an_unknown_hook_is_reported_at_setup_with_its_sae(tmp_path) -> None:
    module = online(sae=TEMPLATE, hooks=[H0, "blocks.1.hook_resid_pst"])
    with pytest.raises(KeyError, match=r"SAE 'blocks_1_resid_pst'.*blocks.1.hook_resid_post"):
        trainer(tmp_path, max_steps=1).fit(module, images())


# ---------------------------------------------------------------------------------------------------- training
def test_each_sae_of_a_multi_sae_run_trains_exactly_as_alone(tmp_path) -> None:
    """Bitwise: the SAEs share the backbone pass and (per hook) the buffer, nothing else."""
    multi = online(sae=TEMPLATE, saes=[{"hook_name": H0, "k": 2}, {"hook_name": H0, "k": 4, "lr": 1e-3},
                                       {"hook_name": H1, "k": 4}])  # fmt: skip
    trainer(tmp_path / "multi", max_steps=12).fit(multi, images())
    assert len(multi.groups) == 2  # two hooks: two buffers; the two SAEs on H0 shared one
    for name, entry in zip(multi.saes, ({"k": 2}, {"k": 4, "lr": 1e-3}, {"k": 4}), strict=True):
        hook = multi.saes[name].cfg.hook_name
        lr = entry.pop("lr", 3e-3)
        alone = online(sae={**TEMPLATE, **entry, "hook_name": hook}, lr=lr)
        trainer(tmp_path / name, max_steps=12).fit(alone, images())
        for (key, p), (_, q) in zip(multi.saes[name].named_parameters(), alone.sae.named_parameters(), strict=True):
            assert torch.equal(p, q), f"{name}.{key} differs from the SAE trained alone"


def test_outputs_logs_and_table_per_sae(tmp_path) -> None:
    module = online(sae=TEMPLATE, hooks=[H0, H1], sweep={"k": [2, 4]})
    loader = images()
    t = trainer(tmp_path, max_steps=6, callbacks=[SAEEvaluator(n_batches=2, print_table=False)])
    t.fit(module, loader, val_dataloaders=loader)
    run = tmp_path / "lightning_logs" / "version_0"
    names = list(module.saes)
    assert names == ["blocks_0_resid_post__k2", "blocks_0_resid_post__k4", "blocks_1_resid_post__k2",
                     "blocks_1_resid_post__k4"]  # fmt: skip
    for name in names:
        sae = SparseAutoencoder.load(run / "saes" / name)
        assert sae.cfg.k == module.saes[name].cfg.k
        table = json.loads((run / "saes" / name / "eval.json").read_text())
        assert table["name"] == name and table["global_step"] == 6
        assert f"train/{name}/l0" in t.logged_metrics and f"eval/{name}/explained_variance_pct" in t.logged_metrics
    csv_rows = (run / "eval_table.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 4 and csv_rows[0].startswith("name,explained_variance_pct")
    assert "| SAE |" in (run / "eval_table.md").read_text()
    l0 = {n: float(t.logged_metrics[f"train/{n}/l0"]) for n in names}
    assert l0["blocks_0_resid_post__k2"] <= 2 < l0["blocks_0_resid_post__k4"] <= 4


def test_compute_loss_overrides_see_the_sae_being_stepped(tmp_path) -> None:
    seen = []

    class Recording(SAEModule):
        def compute_loss(self, x, target):
            seen.append((self.sae_name, self.sae.cfg.k, self.hook_name))
            return super().compute_loss(x, target)

    module = Recording(sae=TEMPLATE, sweep={"k": [2, 4]}, hook_name=H0, backbone="test/vit-tiny",
                       pretrained_backbone=False, buffer_tokens=0, batch_tokens=68, init_tokens=68)  # fmt: skip
    trainer(tmp_path, max_steps=2).fit(module, images())
    assert seen[:2] == [("blocks_0_resid_post__k2", 2, H0), ("blocks_0_resid_post__k4", 4, H0)]


def test_cached_mode_reads_several_hooks_in_lockstep(tmp_path) -> None:
    cache = ActivationCacheModule("test/vit-tiny", hook_names=[H0, H1], pretrained_backbone=False)
    writer = ActivationWriter(str(tmp_path / "acts"), images_per_shard=16)
    trainer(tmp_path, callbacks=[writer]).predict(cache, images(n=48), return_predictions=False)
    data = ActivationDataModule(str(tmp_path / "acts"), batch_size=64, hooks=[H0, H1], seed=1)
    module = SAEModule(sae=TEMPLATE, hooks=[H0, H1], init_tokens=128, lr=3e-3)
    t = trainer(tmp_path / "fit", max_steps=8)
    t.fit(module, datamodule=data)
    seen = set(module.tokens_seen.values())
    assert t.global_step == 8 and len(seen) == 1 and 7 * 64 < seen.pop() <= 8 * 64  # the same rows of both hooks
    with pytest.raises(ValueError, match="need activations of several hooks: give the activation data module"):
        trainer(tmp_path / "bad", max_steps=1).fit(
            SAEModule(sae=TEMPLATE, hooks=[H0, H1]),
            datamodule=ActivationDataModule(str(tmp_path / "acts" / H0), batch_size=64),
        )


def test_a_run_that_does_not_fit_in_memory_fails_at_setup_with_the_numbers(tmp_path) -> None:
    module = online(sae=TEMPLATE, hooks=[H0, H1], buffer_tokens=1 << 16, memory_budget_gb=1e-4)
    with pytest.raises(MemoryError, match=r"needs about .* GiB \(buffers .* GiB, SAEs \+ gradients \+ Adam .*\) but "
                                          r"only 0\.00 GiB are allowed \(memory_budget_gb\)"):  # fmt: skip
        trainer(tmp_path, max_steps=1).fit(module, images())
    need = module.memory_needed()
    assert need["buffers"] == 2 * (1 << 16) * 32 * 4  # per hook group: buffer_tokens x width x 4 bytes


def test_a_multi_sae_run_resumes_exactly(tmp_path) -> None:
    writer = ShardWriter(tmp_path / "acts" / H0, d=32, tokens_per_image=16, images_per_shard=16, seed=3)
    writer.add(torch.randn(64 * 16, 32, generator=torch.Generator().manual_seed(0)), 64)
    writer.close()
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root, steps, ckpt=None):
        module = SAEModule(sae={**TEMPLATE, "hook_name": H0}, sweep={"k": [2, 4]}, init_tokens=128, lr=3e-3)
        cb = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
        data = ActivationDataModule(str(tmp_path / "acts" / H0), batch_size=96, seed=5)
        trainer(root, max_steps=steps, callbacks=[cb]).fit(module, datamodule=data, ckpt_path=ckpt)
        return module

    straight = fit(tmp_path / "a", 9)
    fit(tmp_path / "b", 4)
    resumed = fit(tmp_path / "b", 9, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for name in straight.saes:
        for p, q in zip(straight.saes[name].parameters(), resumed.saes[name].parameters(), strict=True):
            assert torch.equal(p, q), name


def test_the_clip_all_layers_config_is_vit_prismas_table_in_one_run() -> None:
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs/sae/clip-b32-imagenet/all_layers.yaml").read_text()
    )
    args = cfg["model"]["init_args"]
    specs, _ = expand_specs(args["sae"], hooks=args["hooks"], hook_overrides=args["hook_overrides"])
    assert len(specs) == 24
    coef = {s.config.hook_name: s.config.l1_coefficient for s in specs}
    assert coef["blocks.2.hook_resid_post"] == coef["blocks.11.hook_mlp_out"] == 5e-5
    assert sum(c == 1e-5 for c in coef.values()) == 22  # the per-layer files' coefficients, row by row
    for i in range(12):
        for hook in ("resid_post", "mlp_out"):
            single = yaml.safe_load(
                (
                    Path(__file__).resolve().parents[1] / f"configs/sae/clip-b32-imagenet/layer{i:02d}_{hook}.yaml"
                ).read_text()
            )["model"]["init_args"]["sae"]
            assert coef[f"blocks.{i}.hook_{hook}"] == float(single["l1_coefficient"])
    with pytest.raises(
        ValueError, match=r"hook_overrides names hooks no SAE of this run reads: 'blocks\.2\.hook_resid_pst'"
    ):
        expand_specs(
            args["sae"], hooks=args["hooks"], hook_overrides={"blocks.2.hook_resid_pst": {"l1_coefficient": 1}}
        )


@pytest.mark.slow
def test_the_dsprites_all_layers_config_runs_offline(tmp_path) -> None:
    from pathlib import Path

    from prisma_lightning.cli import PrismaCLI

    root = Path(__file__).resolve().parents[1]
    cli = PrismaCLI(args=["fit", "--config", str(root / "configs/sae/dsprites_all_layers.yaml"),
                          "--model.init_args.backbone", str(root / "examples/checkpoints/dsprites-vit-2l"),
                          "--trainer.max_steps", "12", "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.enable_progress_bar", "false", "--data.init_args.subset_size", "2000",
                          "--model.init_args.buffer_tokens", "4096",
                          "--model.init_args.init_tokens", "1024"])  # fmt: skip
    assert len(cli.model.saes) == 8 and len(cli.model.groups) == 4
    run = Path(cli.trainer.log_dir)
    rows = (run / "eval_table.csv").read_text().strip().splitlines()
    assert len(rows) == 9 and len(list((run / "saes").iterdir())) == 8
