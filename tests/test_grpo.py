"""GRPOModule: RecPO learns planted preferences, checkpoints hold only LoRA weights and resume exactly, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import RecDataModule
from lightning_modules import GRPOModule
from lightning_modules.grpo import OptimConfig
from minirec.losses import LossConfig
from minirec.io import ConfigError, DataError
from minirec.policy import PolicyConfig
from minirec.processing import ProcessingConfig
from minirec.recpo import SamplingConfig, rollout_forward

SYNTH = ProcessingConfig(dataset="synthetic", synthetic_users=160, synthetic_items=32)


def make_dm(tmp_path: Path, **kw) -> RecDataModule:
    args = dict(processing=SYNTH, cache_dir=str(tmp_path / "cache"), max_val_samples=48, train_batch_size=8,
                eval_batch_size=16, item_batch_size=32)
    return RecDataModule(**{**args, **kw})


def make_module(loss: LossConfig | None = None, **optim) -> GRPOModule:
    return GRPOModule(
        policy=PolicyConfig(pretrained="tiny-random-qwen2", lora_r=8, lora_alpha=16, lora_dropout=0.0),
        sampling=SamplingConfig(group_size=2, max_new_tokens=4),
        loss=loss or LossConfig(),
        optim=OptimConfig(**{"lr": 3e-3, "micro_batch_size": 8, **optim}),
        eval_max_new_tokens=4,
    )


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                default_root_dir=str(tmp_path), enable_model_summary=False)
    return L.Trainer(**{**args, **kw})


def test_recpo_learns_planted_preferences(tmp_path: Path) -> None:
    """val NDCG@10 after a short RecPO run clearly beats its value before training (seeded)."""
    L.seed_everything(0)
    dm, module = make_dm(tmp_path), make_module()
    t = trainer(tmp_path, max_steps=20, limit_val_batches=3, enable_checkpointing=False, limit_train_batches=20)
    before = t.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    t.fit(module, datamodule=dm)
    after = t.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    assert after > before + 0.15, (before, after)  # measured: 0.154 -> 0.48..0.58 over seeds 0-2


class LoraGrads(L.Callback):
    """Records the LoRA gradients of every optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({k: p.grad.clone() for k, p in pl_module.named_parameters() if "lora_" in k})


def test_update_does_not_depend_on_the_micro_batch_size(tmp_path: Path) -> None:
    """An update over 1, 2 or 4 micro-batches has the same gradient: each micro-batch's loss carries its share, and
    the items (targets and sampled negatives, encoded once per update) receive every micro-batch's gradient.
    (Leave-one-out advantages: the rewards of differently sized forwards differ by rounding, which the gaussian
    advantage of a group with near-equal rewards would magnify.)"""
    grads = []
    for mb in (8, 4, 2):
        L.seed_everything(0)
        loss = LossConfig(advantage="leave_one_out", rec_negatives="sampled", sampled_negatives=8)
        module = make_module(lr=1e-2, micro_batch_size=mb, loss=loss)
        record = LoraGrads()
        trainer(tmp_path / str(mb), max_steps=1, limit_val_batches=0, enable_checkpointing=False,
                callbacks=[record]).fit(module, datamodule=make_dm(tmp_path, train_batch_size=4))
        assert len(record.grads) == 1 and any(g.abs().max() > 0 for g in record.grads[0].values())
        grads.append(record.grads[0])
    for other in grads[1:]:
        for key, value in grads[0].items():
            torch.testing.assert_close(other[key], value, atol=1e-6, rtol=1e-4)


def test_update_scoring_its_own_forward_equals_a_separate_scoring_pass(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With one update per batch and no LoRA dropout the update takes each micro-batch's rewards from its own
    forward; its rewards, advantages and gradients are those of a separate no-grad scoring pass. Dropout, more PPO
    epochs or the reference loss need the separate pass."""
    runs = []
    for separate in (False, True):
        L.seed_everything(0)
        monkeypatch.setattr(GRPOModule, "separate_scoring_pass", property(lambda self, s=separate: s))
        module, record, seen = make_module(lr=1e-2, micro_batch_size=4), LoraGrads(), []
        real = module.loss.forward
        module.loss.forward = lambda *a, **k: seen.append((a[3], a[7])) or real(*a, **k)
        calls = []
        monkeypatch.setattr("lightning_modules.grpo.rollout_forward",
                            lambda *a, **k: calls.append(1) or rollout_forward(*a, **k))
        trainer(tmp_path / str(separate), max_steps=2, limit_val_batches=0, enable_checkpointing=False,
                callbacks=[record]).fit(module, datamodule=make_dm(tmp_path, train_batch_size=4))
        assert len(calls) == (2 if separate else 0) and len(seen) == 2 * 2  # 2 steps x 2 micro-batches
        assert any(adv.abs().max() > 0 for adv, _ in seen)
        runs.append((seen, record.grads))
    (fused, fused_grads), (separate, separate_grads) = runs
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for g, h in zip(fused_grads, separate_grads):
        for key in g:
            torch.testing.assert_close(g[key], h[key], atol=1e-6, rtol=1e-4)
    monkeypatch.undo()
    assert not make_module().separate_scoring_pass
    assert make_module(ppo_epochs=2).separate_scoring_pass
    assert make_module(loss=LossConfig(loss_impl="reference")).separate_scoring_pass


class SeenIds(L.Callback):
    """Records the sample ids of every training batch."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(batch["sample_id"].tolist())


def test_checkpoint_holds_only_lora_and_resumes_exactly(tmp_path: Path) -> None:
    """A run killed mid-epoch resumes at the same global step and the same data position as an unbroken run."""
    L.seed_everything(0)
    unbroken = SeenIds()
    trainer(tmp_path / "a", max_steps=4, limit_val_batches=0, callbacks=[unbroken], enable_checkpointing=False).fit(
        make_module(), datamodule=make_dm(tmp_path, max_train_samples=40))

    L.seed_everything(0)
    first = SeenIds()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    module = make_module()
    trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[ckpt_cb, first]).fit(
        module, datamodule=make_dm(tmp_path, max_train_samples=40))
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    n_trainable = sum(1 for p in module.parameters() if p.requires_grad)
    assert len(ckpt["state_dict"]) == n_trainable
    assert len(ckpt["optimizer_states"][0]["state"]) == n_trainable

    resumed, seen = make_module(), SeenIds()
    t2 = trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[seen])
    t2.fit(resumed, datamodule=make_dm(tmp_path, max_train_samples=40), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t2.global_step == 4
    assert first.ids == unbroken.ids[:2] and seen.ids == unbroken.ids[2:4]  # same data position (5 batches/epoch)
    lora = {k: v for k, v in resumed.state_dict().items() if "lora_" in k}
    assert any(not torch.equal(lora[k], ckpt["state_dict"][k]) for k in lora)  # it trained on from the checkpoint


def test_bad_settings_fail_clearly() -> None:
    with pytest.raises(DataError, match="group_size must be ≥ 1"):
        SamplingConfig(group_size=0)
    with pytest.raises(DataError, match="loss_impl must be one of"):
        LossConfig(loss_impl="paper")
    with pytest.raises(DataError, match="model.pretrained=.no-such-preset.: not a preset"):
        make_module().__class__(policy=PolicyConfig(pretrained="no-such-preset"))


def test_non_finite_reward_stops_with_step_and_sample_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_modules.grpo as grpo

    def nan_rewards(user_emb, catalog, target, history, cfg):
        return torch.full((user_emb.shape[0],), float("nan")), torch.ones(user_emb.shape[0], dtype=torch.long)

    monkeypatch.setattr(grpo, "score_rollouts", nan_rewards)
    with pytest.raises(FloatingPointError, match=r"non-finite reward at global step 0; sample ids \[\d+"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(make_module(), datamodule=make_dm(tmp_path))


def test_pipeline_deepspeed_settings_come_from_the_shipped_presets() -> None:
    """The pipeline's DeepSpeed strategy is configs/strategy/deepspeed-zero{2,3}.yaml (one source of truth), with the
    fit's gradient clipping; DeepSpeed's own accumulation counter stays off (RecPO steps the optimizer itself)."""
    import yaml

    from pipeline import deepspeed_settings

    for stage in (2, 3):
        preset = yaml.safe_load((Path(__file__).parents[1] / f"configs/strategy/deepspeed-zero{stage}.yaml").read_text())
        settings = deepspeed_settings(stage, 0.5)
        expected = preset["trainer"]["strategy"]["init_args"]
        assert settings == {**expected, "config": {**expected["config"], "gradient_clipping": 0.5}}
        assert settings["config"]["zero_optimization"]["stage"] == stage
        assert settings["config"]["managed_gradient_accumulation"] is False and settings["exclude_frozen_parameters"]


class CatalogProbe(L.Callback):
    """At batch 2 (after two updates, so LoRA is no longer a no-op): the cached catalogue and two fresh encodings; the
    targets of batch 1, whose catalogue rows were refreshed after the last update."""

    def __init__(self) -> None:
        self.cached = self.first = self.second = self.refreshed = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.refreshed = batch["target"].unique()
        if batch_idx == 2:
            assert pl_module.policy.training  # fitting: LoRA dropout is active for the policy's own forward passes
            self.cached = pl_module.catalog.clone()
            self.first, self.second = pl_module.encode_catalog(), pl_module.encode_catalog()


def test_catalog_is_encoded_in_eval_mode_during_fit(tmp_path: Path) -> None:
    """Two encodings of the catalogue during a fit are equal (no dropout), and the rows refreshed after each step are
    the eval-mode encodings too (regression: the catalogue was encoded with LoRA dropout on)."""
    L.seed_everything(0)
    module = GRPOModule(
        policy=PolicyConfig(pretrained="tiny-random-qwen2", lora_r=8, lora_alpha=16, lora_dropout=0.5),
        sampling=SamplingConfig(group_size=2, max_new_tokens=4), optim=OptimConfig(lr=3e-2, micro_batch_size=8),
        eval_max_new_tokens=4,
    )
    probe = CatalogProbe()
    trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[probe], enable_checkpointing=False).fit(
        module, datamodule=make_dm(tmp_path))
    assert torch.equal(probe.first, probe.second)
    rows = probe.refreshed
    assert torch.allclose(probe.cached[rows], probe.first[rows], atol=1e-5)  # the per-step refresh is eval mode too


def test_sampled_negatives_are_encoded_by_the_current_model_with_gradient(tmp_path: Path) -> None:
    """`rec_negatives: sampled` ranks the target against items encoded like the target: by the model being trained and
    with gradient (regression: cached-catalogue negatives, and then fresh but detached ones, let the rec loss fall by
    a shift common to every item, pulling all targets towards the users alike, which ranks nothing better)."""
    L.seed_everything(0)
    module = make_module(lr=3e-2, loss=LossConfig(rec_negatives="sampled", sampled_negatives=8))
    seen = []
    real = module.loss.forward

    def record(*args, **kwargs):
        neg, ids = kwargs["extra_negatives"], kwargs["extra_ids"]
        seen.append((ids, kwargs["item_ids"], neg.requires_grad, neg.detach().clone(), module.encode_catalog()[ids],
                     module.catalog[ids].clone()))
        return real(*args, **kwargs)

    module.loss.forward = record
    trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False).fit(module, datamodule=make_dm(tmp_path))
    assert len(seen) % 4 == 0 and all(ids.unique().numel() == 8 for ids, *_ in seen)  # each micro-batch of 4 steps
    for ids, targets, with_grad, neg, fresh, _ in seen:
        assert with_grad and not torch.isin(ids, targets).any()
        torch.testing.assert_close(neg, fresh, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[-1][5], seen[-1][4], atol=1e-3)  # the cache has gone stale by then
    assert len({tuple(ids.tolist()) for ids, *_ in seen}) == 4  # redrawn every step, shared by its micro-batches


def test_non_finite_embeddings_in_evaluation_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN user embeddings in validation raise with step and sample ids (regression: rank 0 gave NDCG = inf, HR = 1);
    NaN item embeddings raise when the catalogue is encoded."""
    module = make_module()
    real = module.user_embeddings

    def nan_users(batch):
        h, seq, mask = real(batch)
        return torch.full_like(h, float("nan")), seq, mask

    monkeypatch.setattr(module, "user_embeddings", nan_users)
    with pytest.raises(FloatingPointError, match=r"non-finite user embedding at global step 0; sample ids \[\d+"):
        trainer(tmp_path, limit_val_batches=1).validate(module, datamodule=make_dm(tmp_path), verbose=False)
    monkeypatch.undo()
    from lightning_modules import policy_module

    policy_module._BASE_CATALOG.clear()  # a fresh adapter ranks against the base catalogue: encode it here
    module = make_module()
    monkeypatch.setattr(module.policy, "encode", lambda ids, mask: torch.full((ids.shape[0], 64), float("nan")))
    with pytest.raises(FloatingPointError, match=r"non-finite item embeddings at global step 0; item ids \[1"):
        trainer(tmp_path, limit_val_batches=1).validate(module, datamodule=make_dm(tmp_path), verbose=False)


def test_datamodule_must_render_prompts_for_the_policy(tmp_path: Path) -> None:
    """Prompts ending with another marker, or tokenized by another model, are refused before anything runs."""
    from minirec.io import ConfigError
    from minirec.prompts import PromptConfig

    with pytest.raises(ConfigError, match=r"data.prompts.answer_marker='<rec>' differs from the policy's"):
        trainer(tmp_path).validate(make_module(), datamodule=make_dm(tmp_path, prompts=PromptConfig(answer_marker="<rec>")),
                                   verbose=False)
    dm = make_dm(tmp_path)  # the tiny presets share one tokenizer: give the datamodule's an extra token
    dm.setup("validate")
    dm.tokenizer = copy.deepcopy(dm.tokenizer)
    dm.tokenizer.add_tokens(["Caf"])
    with pytest.raises(ConfigError, match=r"data.tokenizer='tiny-random-qwen2' tokenizes differently"):
        trainer(tmp_path).validate(make_module(), datamodule=dm, verbose=False)


def test_test_reports_policy_against_baselines(tmp_path: Path) -> None:
    """`trainer.test` gives the policy, zero-shot, popularity and random rows on the same samples with intervals; an
    untrained policy equals zero-shot, popularity matches a by-hand ranking, and random matches its closed form."""
    from minirec.evaluation import random_expectation

    L.seed_everything(0)
    dm, module, generated = make_dm(tmp_path, max_test_samples=24), make_module(), []
    embed = module.user_embeddings
    module.user_embeddings = lambda batch: generated.append(len(batch["target"])) or embed(batch)
    out = trainer(tmp_path).test(module, datamodule=dm, verbose=False)[0]
    assert sum(generated) == 24  # a fresh adapter is the base model: its zero-shot ranks are not computed again
    report = __import__("json").loads((tmp_path / "test_metrics.json").read_text())
    baselines = {"zero_shot", "popularity", "random"}
    assert report["samples"] == 24
    assert set(report["methods"]) == {"policy", *baselines, *(f"policy-{b}" for b in baselines)}
    assert (tmp_path / "test_report.md").read_text().count("[") >= 4 * 8
    ranks = torch.tensor(report["ranks"]["policy"])  # per-sample ranks: the means follow from them
    assert set(report["ranks"]) == {"policy", "zero_shot", "popularity"} and ranks.shape == (24,)
    assert report["methods"]["policy"]["hr@10"]["mean"] == pytest.approx(float((ranks <= 10).float().mean()))
    for name in ("ndcg@10", "hr@50"):
        pol, zs = report["methods"]["policy"][name], report["methods"]["zero_shot"][name]
        assert pol == zs  # the adapter starts as a no-op
        assert report["methods"]["policy-zero_shot"][name] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}  # paired
        assert pol["lo"] <= pol["mean"] <= pol["hi"]
        assert out[f"test/{name}"] == pytest.approx(pol["mean"])
        assert out[f"test/popularity/{name}"] == pytest.approx(report["methods"]["popularity"][name]["mean"])

    counts = dm.item_popularity().float()
    hits, cands = [], []
    for batch in dm.test_dataloader():
        for t, hist in zip(batch["target"].tolist(), batch["history"].tolist()):
            blocked = {h for h in hist if h} - {t}
            better = [i for i in range(1, dm.num_items + 1) if i not in blocked and counts[i] >= counts[t]]
            hits.append(len(better) <= 10)
            cands.append(dm.num_items - len(blocked))
    assert report["methods"]["popularity"]["hr@10"]["mean"] == pytest.approx(sum(hits) / len(hits))
    expected = random_expectation(torch.tensor(cands), (5, 10, 20, 50)).mean(0)
    assert report["methods"]["random"]["hr@10"]["mean"] == pytest.approx(float(expected[5]), rel=1e-5)


def test_base_catalogue_is_encoded_once_and_equals_a_fresh_adapters(tmp_path: Path) -> None:
    """Validating a fresh adapter ranks against the base model's catalogue, a fit from it starts from the same one, and
    a later test's zero-shot reference reuses it, encoded once; it equals the encoding with the fresh adapter on,
    exactly."""
    from lightning_modules import policy_module

    class Start(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.cached, self.with_adapter = pl_module.catalog.clone(), pl_module.encode_catalog()

    L.seed_everything(0)
    policy_module._BASE_CATALOG.clear()
    dm, module, start = make_dm(tmp_path, max_test_samples=8), make_module(), Start()
    calls = []
    encode = module.encode_catalog
    module.encode_catalog = lambda *a, **k: calls.append(1) or encode(*a, **k)
    trainer(tmp_path, limit_val_batches=1).validate(module, datamodule=dm, verbose=False)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False, callbacks=[start])
    t.fit(module, datamodule=dm)
    assert module.policy.adapter_is_identity() is False  # trained, so the test encodes the policy's own catalogue
    generated, embed = [], module.user_embeddings
    module.user_embeddings = lambda batch: generated.append(len(batch["target"])) or embed(batch)
    t.test(module, datamodule=dm, verbose=False)
    assert sum(generated) == 2 * 8  # trained: the policy's and the zero-shot reasoning of every test sample
    assert torch.equal(start.cached, start.with_adapter)
    assert torch.equal(module.zero_shot_catalog, start.cached)
    assert len(calls) == 3  # base (validation), the probe above, the policy's at test: nothing else was encoded


def test_fixed_base_items_stay_fixed_while_users_learn(tmp_path: Path) -> None:
    """`policy.item_encoder: base`: every catalogue of the run (train start, after each step, validation, test) is the
    base model's, the rec loss's items carry no gradient, and the user side still learns the planted preferences."""
    from lightning_modules import policy_module

    L.seed_everything(0)
    policy_module._BASE_CATALOG.clear()
    module = GRPOModule(
        policy=PolicyConfig(pretrained="tiny-random-qwen2", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                            item_encoder="base"),
        sampling=SamplingConfig(group_size=2, max_new_tokens=4), optim=OptimConfig(lr=3e-3, micro_batch_size=8),
        eval_max_new_tokens=4,
    )
    seen = []
    real = module.loss.forward
    module.loss.forward = lambda *a, **k: seen.append(a[5].requires_grad) or real(*a, **k)
    dm = make_dm(tmp_path, max_test_samples=16)
    t = trainer(tmp_path, max_steps=20, limit_val_batches=3, enable_checkpointing=False, limit_train_batches=20)
    before = t.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    base = module.catalog.clone()
    t.fit(module, datamodule=dm)
    assert torch.equal(module.catalog, base)  # not refreshed by the steps
    after = t.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    assert torch.equal(module.catalog, base) and seen and not any(seen)
    assert after > before + 0.1, (before, after)
    t.test(module, datamodule=dm, verbose=False)
    assert torch.equal(module.catalog, base) and torch.equal(module.zero_shot_catalog, base)
    with pytest.raises(ConfigError, match="model.item_encoder='lora'"):
        GRPOModule(policy=PolicyConfig(item_encoder="lora"))
