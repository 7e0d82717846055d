"""DeadFeatureResampler: which features are resampled, to what, Adam state, Trainer.fit and DDP identity."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.callbacks import DeadFeatureResampler
from prisma_lightning.modules import SAEModule
from prisma_lightning.sae import SAEConfig, SparseAutoencoder

HOOK = "blocks.0.hook_resid_post"
DEAD = torch.tensor([0, 5, 9, 14, 20, 27])


class FakeStrategy:
    """Single process standing in for one DDP rank: ``reduce`` adds the other ranks' tensors, ``broadcast`` returns
    what rank 0 broadcast (rank 0 must run first)."""

    def __init__(self, rank: int, others: list[torch.Tensor], shared: dict) -> None:
        self.rank, self.others, self.shared = rank, others, shared

    def reduce(self, tensor, reduce_op="mean"):
        assert reduce_op == "sum"
        return tensor + sum(o.to(tensor) for o in self.others)

    def broadcast(self, obj, src=0):
        if self.rank == src:
            self.shared["obj"] = copy.deepcopy(obj)
        return copy.deepcopy(self.shared["obj"])


def fake_trainer(optimizer, strategy=None, rank=0, step=100):
    strategy = strategy or FakeStrategy(0, [], {})
    return SimpleNamespace(strategy=strategy, is_global_zero=rank == 0, global_step=step, optimizers=[optimizer])


def subspace_rows(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows in the first half of the dimensions (what the SAE learns to reconstruct)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, d)
    rows[:, : d // 2] = torch.randn(n, d // 2, generator=gen)
    return rows


def outliers(n: int, d: int = 16) -> torch.Tensor:
    """Large rows along the unused axes: the SAE reconstructs them badly, so they carry almost all the loss."""
    return 30.0 * torch.eye(d)[d // 2 : d // 2 + n]


def trained_sae(**cfg) -> tuple[SparseAutoencoder, torch.optim.Adam]:
    """A small ReLU SAE trained on subspace rows; then the DEAD features are switched off for `window` steps."""
    base = dict(d_in=16, d_sae=32, architecture="relu", dead_feature_window=5, b_dec_init="mean")
    if cfg.get("architecture", "relu") == "relu":
        base["l1_coefficient"] = 1e-3
    sae = SparseAutoencoder(SAEConfig(**{**base, **cfg}))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = subspace_rows(512)
    sae.initialize_b_dec(data)

    def step(i: int) -> None:
        out = sae(data[i * 64 % 512 :][:64], step=i)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    for i in range(20):
        step(i)
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4  # these never fire again
    for i in range(20, 26):
        step(i)
    return sae, opt


def pool_rows() -> torch.Tensor:
    return torch.cat([subspace_rows(200, seed=1), outliers(len(DEAD))])


def mse(sae, x) -> float:
    sae.eval()
    with torch.no_grad():
        out = sae(x)
    sae.train()
    return float(out.mse_loss)


def test_dead_features_are_resampled_from_high_loss_inputs() -> None:
    sae, opt = trained_sae()
    assert set(sae.dead_features().tolist()) == set(DEAD.tolist())
    alive = torch.ones(32, dtype=torch.bool)
    alive[DEAD] = False
    before = {k: v.detach().clone() for k, v in sae.named_parameters()}
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    assert all(opt.state[sae.W_dec]["exp_avg_sq"][DEAD].abs().sum(1) > 0)  # non-trivial state to reset
    enc_norm_alive = sae.W_enc.norm(dim=0)[alive].mean()
    pool = pool_rows()
    loss_before = mse(sae, pool)

    resampler = DeadFeatureResampler(every_n_steps=10, n_samples=pool.shape[0])
    n = resampler.resample(fake_trainer(opt), SimpleNamespace(sae=sae), pool)

    assert n == len(DEAD)
    # Decoder rows: the unit (input - b_dec) of the high-loss rows (loss^2 weighting picks every outlier once).
    expected = pool[-len(DEAD) :] - before["b_dec"]
    expected = expected / expected.norm(dim=1, keepdim=True)
    new_rows = sae.W_dec[DEAD].detach()
    match = (new_rows @ expected.T).argmax(1)
    assert sorted(match.tolist()) == list(range(len(DEAD)))
    assert_close(new_rows, expected[match])
    # Encoder columns: the same direction with 0.2 x the mean alive encoder norm; zero bias.
    enc = sae.W_enc[:, DEAD].detach().T
    assert_close(enc.norm(dim=1), torch.full((len(DEAD),), 0.2 * float(enc_norm_alive.detach())))
    assert_close(enc / enc.norm(dim=1, keepdim=True), new_rows)
    assert torch.equal(sae.b_enc[DEAD], torch.zeros(len(DEAD)))
    # Live features and b_dec: bitwise untouched.
    assert torch.equal(sae.W_dec[alive], before["W_dec"][alive])
    assert torch.equal(sae.W_enc[:, alive], before["W_enc"][:, alive])
    assert torch.equal(sae.b_enc[alive], before["b_enc"][alive])
    assert torch.equal(sae.b_dec, before["b_dec"])
    # Adam: moments of the resampled entries zeroed, every other entry unchanged.
    for name, index, rest in (("W_dec", DEAD, alive), ("b_enc", DEAD, alive)):
        param = getattr(sae, name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[param][key][index], torch.zeros_like(param[index]))
            assert torch.equal(opt.state[param][key][rest], state_before[id(param)][key][rest])
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[sae.W_enc][key]
        assert torch.equal(state[:, DEAD], torch.zeros(16, len(DEAD)))
        assert torch.equal(state[:, alive], state_before[id(sae.W_enc)][key][:, alive])
        assert torch.equal(opt.state[sae.b_dec][key], state_before[id(sae.b_dec)][key])
    assert torch.equal(sae.steps_since_fired[DEAD], torch.zeros(len(DEAD), dtype=torch.long))
    assert sae.dead_features().numel() == 0
    assert mse(sae, pool) < loss_before


def test_unit_decoder_rows_and_topk_architecture() -> None:
    sae, opt = trained_sae(architecture="topk", k=4, decoder_norm="unit")
    resampler = DeadFeatureResampler(every_n_steps=10, n_samples=206)
    pool = pool_rows()
    loss_before = mse(sae, pool)
    dead = sae.dead_features()
    assert set(DEAD.tolist()) <= set(dead.tolist())
    assert resampler.resample(fake_trainer(opt), SimpleNamespace(sae=sae), pool) == dead.numel()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert mse(sae, pool) <= loss_before


def test_no_dead_features_changes_nothing() -> None:
    sae, opt = trained_sae()
    with torch.no_grad():
        sae.steps_since_fired.zero_()
    before = copy.deepcopy(sae.state_dict())
    assert DeadFeatureResampler().resample(fake_trainer(opt), SimpleNamespace(sae=sae), pool_rows()) == 0
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k])


def test_two_ranks_resample_identically_and_only_features_dead_everywhere() -> None:
    """Simulated DDP: same weights, different firing counters and pools; reduce/broadcast through a fake strategy."""
    sae0, opt0 = trained_sae()
    sae1, opt1 = copy.deepcopy(sae0), None
    opt1 = torch.optim.Adam(sae1.parameters(), lr=1e-2)
    opt1.load_state_dict(opt0.state_dict())
    with torch.no_grad():
        sae1.steps_since_fired[DEAD[0]] = 0  # feature 0 fired recently on rank 1: not dead globally
    resampler = DeadFeatureResampler(every_n_steps=10, n_samples=206)
    window = resampler.dead_window(sae0)
    fired0 = (sae0.steps_since_fired < window).float()
    fired1 = (sae1.steps_since_fired < window).float()
    shared: dict = {}
    t0 = fake_trainer(opt0, FakeStrategy(0, [fired1], shared), rank=0)
    t1 = fake_trainer(opt1, FakeStrategy(1, [fired0], shared), rank=1)
    n0 = resampler.resample(t0, SimpleNamespace(sae=sae0), pool_rows())
    n1 = resampler.resample(t1, SimpleNamespace(sae=sae1), None)  # rank 1's pool is never used
    assert n0 == n1 == len(DEAD) - 1
    for (name, a), b in zip(sae0.named_parameters(), sae1.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(sae0.b_enc[DEAD[0]], torch.tensor(-1e4)) or sae0.b_enc[DEAD[0]] < -1e3  # not resampled
    assert torch.equal(sae0.b_enc[DEAD[1:]], torch.zeros(len(DEAD) - 1))


# ---------------------------------------------------------------------------------------------------- Trainer.fit
def trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    log_every_n_steps=1, accelerator="cpu", devices=1, enable_checkpointing=False)  # fmt: skip
    return pl.Trainer(**{**defaults, **kw})


def kill(module: SAEModule) -> None:
    with torch.no_grad():
        module.sae.b_enc[DEAD] = -1e4


class Snapshot(pl.Callback):
    """Records W_dec before and after the first resampling step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("resampler/n_resampled")
        if value is not None and not self.logged:
            self.steps.append(trainer.global_step)
            self.logged.append(float(value))


@pytest.mark.parametrize("online", [False, True])
def test_resampling_inside_trainer_fit(tmp_path, online: bool) -> None:
    cfg = SAEConfig(d_in=32, expansion_factor=2, architecture="topk", k=4, hook_name=HOOK, b_dec_init="mean",
                    dead_feature_window=4)  # fmt: skip
    if online:
        module = SAEModule(cfg, backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=0,
                           batch_tokens=68, init_tokens=68)  # fmt: skip
        loader = DataLoader(TensorDataset(torch.randn(96, 3, 16, 16), torch.zeros(96)), batch_size=4)
    else:
        module = SAEModule(cfg, init_tokens=64)
        loader = DataLoader(list(torch.randn(24, 64, 32).unbind()), batch_size=None)
    kill(module)
    w_dec = module.sae.W_dec.detach().clone()
    resampler = DeadFeatureResampler(every_n_steps=8, n_samples=128)
    snap = Snapshot()
    trainer(tmp_path, max_steps=12, callbacks=[resampler, snap]).fit(module, loader)
    assert resampler.last_step >= 8 and resampler.total_resampled >= len(DEAD)
    assert snap.logged and snap.logged[0] >= len(DEAD)
    changed = (module.sae.W_dec.detach() - w_dec).abs().sum(1) > 0
    assert changed[DEAD].all()
    assert module.sae.b_enc[DEAD].abs().max() < 1.0  # no longer switched off
    assert_close(module.sae.W_dec.norm(dim=1), torch.ones(64))
    assert resampler.state_dict() == {"last_step": resampler.last_step, "total_resampled": resampler.total_resampled}


class SaveState(pl.Callback):
    """Each rank writes its SAE state (and its resampling count) at the end of training."""

    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.sae.state_dict().items()}
        state["total_resampled"] = torch.tensor(trainer.callbacks[0].total_resampled)
        torch.save(state, f"{self.root}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_resample_identically(tmp_path) -> None:
    """Real DDP (2 CPU processes, gloo): each rank sees other rows, yet both end with bit-identical SAEs."""
    cfg = SAEConfig(d_in=32, expansion_factor=2, architecture="topk", k=4, hook_name=HOOK, b_dec_init="mean",
                    dead_feature_window=4)  # fmt: skip
    module = SAEModule(cfg, init_tokens=64, export_dir=str(tmp_path / "sae"))
    kill(module)
    loader = DataLoader(list(torch.randn(24, 64, 32).unbind()), batch_size=None)
    callbacks = [DeadFeatureResampler(every_n_steps=8, n_samples=128), SaveState(str(tmp_path))]
    trainer(tmp_path, max_steps=10, devices=2, strategy="ddp_spawn", logger=False, callbacks=callbacks).fit(
        module, loader
    )
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert int(rank0["total_resampled"]) == int(rank1["total_resampled"]) >= len(DEAD)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    assert rank0["b_enc"][DEAD].abs().max() < 1.0
