"""ScoringModule + ScoreWriter: per-sample scores with the proxy policy in both representativeness spaces, proxy loading
from a checkpoint and from an exported adapter."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import ScoreWriter
from datamodules import RecDataModule
from lightning_modules import GRPOModule, ScoringModule, policy_module
from minirec.io import DataError
from minirec.policy import PolicyConfig
from minirec.subsets import SelectionConfig
from minirec.processing import ProcessingConfig
from minirec.recpo import RewardConfig, SamplingConfig

SYNTH = ProcessingConfig(dataset="synthetic", synthetic_users=60, synthetic_items=24)
TINY = PolicyConfig(pretrained="tiny-random-qwen2", lora_r=4, lora_alpha=8, lora_dropout=0.0)
SAMPLING = SamplingConfig(max_new_tokens=3)


def make_dm(tmp_path: Path, **kw) -> RecDataModule:
    return RecDataModule(processing=SYNTH, cache_dir=str(tmp_path / "cache"), eval_batch_size=6, **kw)


def predict(tmp_path: Path, module: ScoringModule, out: Path, ks=(6, 12)) -> None:
    writer = ScoreWriter(str(out), SelectionConfig(ks=tuple(ks), num_stages=2))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(module, datamodule=make_dm(tmp_path, max_predict_samples=18), return_predictions=False)


@pytest.mark.parametrize("space", ["hidden", "lora"])
def test_scores_and_selection_in_both_spaces(tmp_path: Path, space: str) -> None:
    L.seed_everything(0)
    cutoff = 1000 if space == "hidden" else 5  # the default covers the tiny catalogue: every rollout is rewarded
    module = ScoringModule(policy=TINY, sampling=SAMPLING, reward=RewardConfig(ndcg_k=cutoff), num_rollouts=3,
                           space=space, projection_dim=32, eval_max_new_tokens=3)
    out = tmp_path / "scores"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(tmp_path, module, out)
    warned = [w for w in caught if "no unrewarded samples to prune" in str(w.message)]
    assert len(warned) == (space == "hidden")
    vectors = torch.load(out / "score_table.pt", weights_only=True)
    assert vectors["sample_id"].shape == (18,)
    width = 32 if space == "lora" else module.policy.hidden_size
    assert vectors["rep_vec"].shape == (18, width) and torch.isfinite(vectors["rep_vec"]).all()
    assert vectors["rep_vec"].std(0).max() > 0  # samples differ
    sel = json.loads((out / "selection.json").read_text())
    assert len(sel["ids"]) == 6 and set(sel["ids"]) <= set(vectors["sample_id"].tolist())
    big = json.loads((out / "selection_k12.json").read_text())
    assert big["selection_order"][:6] == sel["selection_order"]  # greedy prefix property
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 19 and rows[0].startswith("sample_id,rewards,mean_reward,L,R,q")
    assert all(len(r.split(",")[1].split()) == 3 for r in rows[1:])  # N = 3 rewards per sample


def test_proxy_from_checkpoint_and_adapter(tmp_path: Path) -> None:
    L.seed_everything(0)
    proxy = GRPOModule(policy=TINY, sampling=SamplingConfig(group_size=2, max_new_tokens=3), eval_max_new_tokens=3)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[ckpt], enable_model_summary=False)
    trainer.fit(proxy, datamodule=make_dm(tmp_path, train_batch_size=4))
    trained = proxy.policy.trainable_state_dict()
    from_ckpt = ScoringModule(proxy=str(tmp_path / "ckpt" / "last.ckpt"), policy=PolicyConfig(pretrained="tiny-random-llama"))
    assert from_ckpt.hparams.policy.pretrained == "tiny-random-qwen2"  # the checkpoint's own policy config wins
    for k, v in from_ckpt.policy.trainable_state_dict().items():
        assert torch.equal(v, trained[k]), k
    proxy.policy.save_adapter(tmp_path / "adapter")
    from_adapter = ScoringModule(proxy=str(tmp_path / "adapter"), policy=TINY, sampling=SAMPLING, num_rollouts=2,
                                 eval_max_new_tokens=3)
    for k, v in from_adapter.policy.trainable_state_dict().items():
        assert torch.allclose(v, trained[k]), k
    predict(tmp_path, from_adapter, tmp_path / "scores", ks=(6,))  # the selection records the proxy it was made with
    selection = json.loads((tmp_path / "scores" / "selection.json").read_text())
    assert selection["proxy_checkpoint"] == str(tmp_path / "adapter")
    fixed = ScoringModule(proxy=str(tmp_path / "adapter"), policy=replace(TINY, item_encoder="base"), sampling=SAMPLING,
                          num_rollouts=2, eval_max_new_tokens=3)
    predict(tmp_path, fixed, tmp_path / "scores_fixed", ks=(6,))  # `item_encoder: base` scores against the base items
    assert torch.equal(fixed.catalog, next(iter(policy_module._BASE_CATALOG.values())))
    assert not torch.allclose(fixed.catalog, from_adapter.catalog, atol=1e-4)
    with pytest.raises(DataError, match="no such checkpoint file or adapter folder"):
        ScoringModule(proxy=str(tmp_path / "missing.ckpt"))
    with pytest.raises(DataError, match="model.space must be"):
        ScoringModule(space="gradient")
