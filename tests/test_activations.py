"""Activation pipeline: mixing buffer, token selection, shard writer / reader, the activation data module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.activations import ActivationShards, MixingBuffer, ShardWriter, select_tokens, tokens_per_image
from prisma_lightning.datamodules.activations import ActivationDataModule


# ---------------------------------------------------------------------------------------------- buffer
def test_buffer_returns_every_row_exactly_once_and_mixes() -> None:
    buf = MixingBuffer(capacity=100, d=3, seed=1)
    rows = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 3)
    assert buf.add(rows[:60]) == 60 and buf.add(rows[60:]) == 40 and buf.full
    assert buf.add(rows[:5]) == 0  # never exceeds its capacity
    out = torch.cat([buf.pop(25) for _ in range(4)])
    assert buf.size == 0
    assert sorted(out[:, 0].tolist()) == list(range(100))
    first = out[:25, 0]
    assert (first >= 50).any() and (first < 50).any()  # a batch mixes early and late rows


def test_buffer_state_dict_resumes_identically() -> None:
    a = MixingBuffer(capacity=50, d=2, seed=3)
    a.add(torch.randn(50, 2))
    a.pop(10)
    b = MixingBuffer(capacity=50, d=2, seed=99)
    b.load_state_dict(a.state_dict())
    assert_close(a.pop(20), b.pop(20))
    with pytest.raises(ValueError, match="does not fit this buffer"):
        MixingBuffer(capacity=10, d=2).load_state_dict(a.state_dict())


def test_buffer_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        MixingBuffer(8, 4).add(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------- tokens
def test_token_selection() -> None:
    acts = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    cls = select_tokens(acts, "cls", n_prefix=2)
    assert cls.shape == (2, 3) and torch.equal(cls, acts[:, 0])  # exactly one row per image
    patches = select_tokens(acts, "patches", n_prefix=2)
    assert torch.equal(patches, acts[:, 2:].reshape(-1, 3))
    assert torch.equal(select_tokens(acts, "all", n_prefix=2), acts.reshape(-1, 3))
    assert tokens_per_image(5, "patches", 2) == 3 and tokens_per_image(5, "cls", 2) == 1
    with pytest.raises(ValueError, match="needs a model with a class token"):
        select_tokens(acts, "cls", n_prefix=0, has_cls=False)


# ---------------------------------------------------------------------------------------------- shards
def write_shards(folder, n_images=10, tpi=4, d=6, images_per_shard=3, **kw):
    data = torch.randn(n_images * tpi, d)
    writer = ShardWriter(folder, d=d, tokens_per_image=tpi, meta={"hook": "h", "model": "m"},
                         images_per_shard=images_per_shard, **kw)  # fmt: skip
    for i in range(0, n_images, 2):
        k = min(2, n_images - i)
        writer.add(data[i * tpi : (i + k) * tpi], k)
    writer.close()
    return data


@pytest.mark.parametrize("file_format", ["npy", "safetensors"])
def test_shard_round_trip_keeps_every_row(tmp_path, file_format: str) -> None:
    data = write_shards(tmp_path, file_format=file_format)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["complete"] and index["n_images"] == 10 and index["n_rows"] == 40
    assert [s["images"] for s in index["shards"]] == [3, 3, 3, 1]
    shards = ActivationShards(tmp_path)
    rows = torch.cat(list(shards.iter_rows(chunk=5)))
    # Rows are shuffled within each shard, never across shards: compare shard by shard as multisets.
    start = 0
    for info in index["shards"]:
        got = rows[start : start + info["rows"]]
        want = data[start : start + info["rows"]]
        assert_close(got[got[:, 0].argsort()], want[want[:, 0].argsort()])
        start += info["rows"]


def test_shard_writer_resumes_after_a_crash(tmp_path) -> None:
    d, tpi = 4, 2
    data = torch.randn(8 * tpi, d)
    writer = ShardWriter(tmp_path, d=d, tokens_per_image=tpi, images_per_shard=2, shuffle=False)
    writer.add(data[: 5 * tpi], 5)  # two complete shards, one image pending: "crash" here
    (tmp_path / "shard_00002.npy").write_bytes(b"partial garbage")  # a half-written, unlisted file
    resumed = ShardWriter(tmp_path, d=d, tokens_per_image=tpi, images_per_shard=2, shuffle=False)
    assert resumed.images_done == 4
    resumed.add(data[4 * tpi :], 4)
    resumed.close()
    assert_close(torch.cat(list(ActivationShards(tmp_path).iter_rows())), data)
    with pytest.raises(ValueError, match="tokens_per_image=2"):
        ShardWriter(tmp_path, d=d, tokens_per_image=3)


def test_truncated_shard_is_detected(tmp_path) -> None:
    write_shards(tmp_path)
    path = tmp_path / "shard_00001.npy"
    path.write_bytes(path.read_bytes()[:100])
    shards = ActivationShards(tmp_path)
    with pytest.raises(ValueError, match="shard_00001.npy is truncated or corrupt"):
        shards.read(1, 0, 2)


def test_nan_activations_are_refused(tmp_path) -> None:
    writer = ShardWriter(tmp_path, d=2, tokens_per_image=1)
    with pytest.raises(ValueError, match="Non-finite"):
        writer.add(torch.tensor([[float("nan"), 0.0]]), 1)


# ---------------------------------------------------------------------------------------------- data module
def test_data_module_batches_cover_rows_and_reshuffle_each_epoch(tmp_path) -> None:
    data = write_shards(tmp_path, n_images=12, tpi=4, images_per_shard=6, shuffle=False)
    dm = ActivationDataModule(str(tmp_path), batch_size=8, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = list(loader)
    epoch1 = list(loader)
    assert len(epoch0) == 6 and all(b.shape == (8, 6) for b in epoch0)
    assert_close(torch.cat(epoch0)[torch.cat(epoch0)[:, 0].argsort()], data[data[:, 0].argsort()])
    assert [b[0, 0].item() for b in epoch0] != [b[0, 0].item() for b in epoch1]


def test_data_module_loader_resumes_mid_epoch(tmp_path) -> None:
    write_shards(tmp_path, n_images=12, tpi=4, images_per_shard=6)
    dm = ActivationDataModule(str(tmp_path), batch_size=4, seed=5)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    loader = dm.train_dataloader()
    it = iter(loader)
    first = [next(it) for _ in range(5)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": 5}
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert_close(torch.stack(first + rest), torch.stack(full))


def test_data_module_splits_every_global_batch_over_ranks(tmp_path, monkeypatch) -> None:
    import prisma_lightning.datamodules.activations as mod

    write_shards(tmp_path, n_images=12, tpi=4, images_per_shard=6)
    dm = ActivationDataModule(str(tmp_path), batch_size=4, seed=1)
    dm.setup("fit")
    single = list(dm.train_dataloader())
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(mod, "_dist_info", lambda r=rank: (r, 2))
        per_rank.append(list(dm.train_dataloader()))
    assert len(per_rank[0]) == len(per_rank[1]) == len(single) == 12
    for whole, a, b in zip(single, *per_rank, strict=True):
        assert a.shape == (2, 6) and b.shape == (2, 6)
        assert_close(torch.cat([a, b]), whole)  # the two ranks together see exactly the one-process batch


def test_data_module_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="prisma predict"):
        ActivationDataModule(str(tmp_path / "missing")).setup("fit")
    write_shards(tmp_path, n_images=2, tpi=2, images_per_shard=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ActivationDataModule(str(tmp_path), batch_size=1000).setup("fit")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        ActivationDataModule(str(tmp_path), batch_size=2).setup("fit")


def test_float16_storage_reads_back_as_float32(tmp_path) -> None:
    data = write_shards(tmp_path, n_images=12, dtype="float16", shuffle=False)
    # Stored as float16 on disk, and the raw shard reader returns the stored dtype.
    assert np.load(tmp_path / "shard_00000.npy", mmap_mode="r").dtype == np.float16
    stored = torch.cat(list(ActivationShards(tmp_path).iter_rows()))
    assert stored.dtype == torch.float16
    assert_close(stored, data.half(), atol=0, rtol=0)  # exactly the float16 rounding of what was written
    # The data module (default dtype float32) yields float32 batches holding those same values.
    dm = ActivationDataModule(str(tmp_path), batch_size=4, shuffle=False)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert batches and all(b.dtype == torch.float32 for b in batches)
    rows = torch.cat(batches)
    assert rows.shape == data.shape
    assert_close(rows, data.half().float(), atol=0, rtol=0)
    # Asking for float16 batches keeps the stored values as they are.
    half = ActivationDataModule(str(tmp_path), batch_size=4, shuffle=False, dtype="float16")
    half.setup("fit")
    assert all(b.dtype == torch.float16 for b in half.train_dataloader())


def test_every_row_is_used_when_shards_are_not_multiples_of_the_batch(tmp_path) -> None:
    """2,048-row shards read in batches of 1,536: no shard tail is dropped (a block may span two shards)."""
    data = write_shards(tmp_path, n_images=64, tpi=64, d=3, images_per_shard=32, shuffle=False)  # 2 x 2048 rows
    dm = ActivationDataModule(str(tmp_path), batch_size=1536, seed=0)
    dm.setup("fit")
    for _ in range(2):  # every epoch
        rows = torch.cat(list(dm.train_dataloader()))
        assert rows.shape[0] == 4096
        assert_close(rows[rows[:, 0].argsort()], data[data[:, 0].argsort()])
    sizes = sorted(b.shape[0] for b in dm.train_dataloader())
    assert sizes == [1024, 1536, 1536]  # the remainder is a smaller last block, not dropped


def test_several_hooks_are_read_in_lockstep(tmp_path) -> None:
    """Hook folders of one caching run: the same tokens in the same order in every batch."""
    base = torch.randn(24 * 5, 4, generator=torch.Generator().manual_seed(0))
    for hook, values in (("blocks.0.hook_resid_post", base), ("blocks.1.hook_resid_post", 3 * base + 1)):
        writer = ShardWriter(tmp_path / hook, d=4, tokens_per_image=5, images_per_shard=7, seed=11)
        writer.add(values, 24)
        writer.close()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    dm = ActivationDataModule(str(tmp_path), batch_size=16, seed=2, hooks=hooks)
    batches = list(dm.train_dataloader())
    assert all(set(b) == set(hooks) for b in batches)
    for b in batches:
        assert_close(b[hooks[1]], 3 * b[hooks[0]] + 1)  # row i of one hook is row i of the other
    assert sum(b[hooks[0]].shape[0] for b in batches) == 24 * 5
    other = ShardWriter(tmp_path / "other", d=4, tokens_per_image=5, images_per_shard=5, seed=11)
    other.add(base, 24)
    other.close()
    with pytest.raises(ValueError, match="do not hold the same rows per shard"):
        ActivationDataModule(str(tmp_path), batch_size=16, hooks=[hooks[0], "other"]).setup("fit")
