"""Every YAML under configs/ (SAE and cache experiments) parses, and the runnable ones run on tiny settings."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from prisma_lightning.cli import PrismaCLI

ROOT = Path(__file__).resolve().parents[1]
SAE_AND_CACHE = sorted((ROOT / "configs" / "sae").rglob("*.yaml")) + sorted((ROOT / "configs" / "cache").glob("*.yaml"))


def subcommand(path: Path) -> str:
    return "predict" if path.parent.name == "cache" else "fit"


@pytest.fixture(scope="module")
def parser():
    """One LightningCLI parser (building it is the slow part); each file is then parsed and validated with it."""
    cli = PrismaCLI(args=["--config", str(ROOT / "configs/sae/cached_shards.yaml"), "--trainer.logger", "false"],
                    run=False)  # fmt: skip
    return cli.parser


@pytest.mark.parametrize("path", SAE_AND_CACHE, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(parser, path: Path) -> None:
    cfg = parser.parse_args(["--config", str(path)])
    assert cfg.model.class_path.startswith("prisma_lightning.modules.")
    init = cfg.model.init_args
    if "sae" in init:
        if init.get("hooks"):  # a multi-SAE run: the template has no hook, each pattern gives one
            from prisma_lightning.modules.sae_specs import expand_braces

            patterns = [init.hooks] if isinstance(init.hooks, str) else init.hooks
            assert all(h.startswith("blocks.") for p in patterns for h in expand_braces(p))
        else:
            assert init.sae.hook_name.startswith("blocks.")
        assert init.sae.d_in > 0
    else:
        assert init.hook_names and all(h.startswith("blocks.") for h in init.hook_names)
    if subcommand(path) == "predict":
        assert any(c.class_path.endswith("ActivationWriter") for c in cfg.trainer.callbacks)


def test_print_config_of_one_experiment() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        PrismaCLI(args=["fit", "--config", str(ROOT / "configs/sae/dinov2_small_imagenet.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "backbone: facebook/dinov2-small" in out.getvalue()


@pytest.mark.parametrize("name", ["slurm_ddp_sae", "torchrun_ddp_sae"])
def test_distributed_overlays_parse_on_top_of_an_experiment(parser, name: str) -> None:
    base = str(ROOT / "configs/sae/cached_shards.yaml")
    cfg = parser.parse_args(["--config", base, "--config", str(ROOT / "configs/distributed" / f"{name}.yaml")])
    strategy = cfg.trainer.strategy
    assert strategy == "ddp" and cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    assert cfg.model.init_args.sae.d_in == 64  # the experiment itself is kept


def test_clip_table_configs_cover_every_layer_and_hook() -> None:
    names = {p.stem for p in (ROOT / "configs" / "sae" / "clip-b32-imagenet").glob("*.yaml")}
    # one config per SAE of ViT-Prisma's table, plus all_layers.yaml: the whole table in one run
    assert names == {f"layer{i:02d}_{h}" for i in range(12) for h in ("resid_post", "mlp_out")} | {"all_layers"}


def test_videomae_movingsprites_config_runs_with_a_tiny_video_backbone(tmp_path) -> None:
    args = [
        "fit", "--config", str(ROOT / "configs/sae/videomae_movingsprites.yaml"),
        "--model.init_args.backbone", "test/video-tiny",
        "--model.init_args.pretrained_backbone", "false",
        "--model.init_args.sae.d_in", "32",
        "--model.init_args.sae.hook_name", "blocks.1.hook_resid_post",
        "--model.init_args.batch_tokens", "64",
        "--model.init_args.buffer_tokens", "256",
        "--model.init_args.init_tokens", "128",
        "--data.init_args.root", str(tmp_path / "sprites"),
        "--data.init_args.n_per_class", "5",
        "--data.init_args.video_frames", "8",
        "--data.init_args.size", "32",
        "--data.init_args.frames", "4",
        "--data.init_args.image_size", "16",
        "--data.init_args.batch_size", "2",
        "--trainer.max_steps", "4",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cli = PrismaCLI(args=args)
    assert cli.trainer.global_step == 4
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    assert (version / "sae" / "cfg.json").is_file()  # exported at the end of fit
    assert (version / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("extra", "d_sae"),
    [
        (["--model.sae.d_sae", "96"], 96),  # d_sae overrides the config's expansion_factor
        (["--model.init_args.sae.expansion_factor", "null", "--model.init_args.sae.d_sae", "80"], 80),
        (["--model.sae.expansion_factor", "2"], 128),  # 2 x d_in 64
    ],
)
def test_sae_width_from_the_command_line(extra: list[str], d_sae: int) -> None:
    cli = PrismaCLI(args=["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.logger", "false",
                          *extra], run=False)  # fmt: skip
    assert cli.model.sae.d_sae == d_sae and cli.model.sae.W_dec.shape == (d_sae, 64)
    # the rest of the configured TopK SAE is kept (a dotted override must not re-resolve the architecture)
    assert cli.model.sae.cfg.architecture == "topk" and cli.model.sae.cfg.k == 16 and cli.model.sae.cfg.aux_k == 64


def test_switching_architecture_on_the_command_line_keeps_the_shared_fields() -> None:
    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.logger", "false",
            "--model.sae.architecture", "relu", "--model.sae.l1_coefficient", "3"]  # fmt: skip
    cfg = PrismaCLI(args=args, run=False).model.sae.cfg
    assert cfg.architecture == "relu" and cfg.l1_coefficient == 3.0
    assert (
        cfg.d_in == 64 and cfg.hook_name == "blocks.1.hook_resid_post" and cfg.normalize_activations == "expected_norm"
    )
    assert not hasattr(cfg, "k")


def test_a_field_of_another_architecture_names_its_owners(capsys) -> None:
    from prisma_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.sae.l1_coefficient", "3"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "'l1_coefficient' is not a field of the configured SAE's architecture; it belongs to relu" in err
    assert "--model.sae.architecture relu" in err


def test_model_help_takes_a_short_class_name() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        PrismaCLI(args=["fit", "--model.help", "SAEModule"])
    assert exit_info.value.code == 0
    text = out.getvalue()
    assert "--model.sweep" in text and "--model.hooks" in text and "TopKConfig" in text
