"""The vLLM rollout engine (`sampling.engine: vllm`): it samples from the policy being trained (LoRA weights synced
after every update), its rollouts repeat under a seed and end with the marker, and RecPO learns with them.

Runs where vLLM is installed (`scripts/test.sh` runs it in the vLLM environment with MINIREC_REQUIRE_VLLM=1, so that a
missing vLLM fails instead of skipping)."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

if os.environ.get("MINIREC_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from minirec.policy import Policy, PolicyConfig  # noqa: E402
from minirec.recpo import SamplingConfig, reseed, sample_rollouts  # noqa: E402
from minirec.vllm_engine import VLLMEngine  # noqa: E402
from test_grpo import make_dm, make_module, trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = SamplingConfig(group_size=3, max_new_tokens=6, engine="vllm", vllm_kv_cache_gb=0.25,
                          vllm_max_model_len=512)


@pytest.fixture(scope="module", params=["lora", "merged"])
def policy_and_engine(request):
    """A fresh tiny policy and an engine following it, for each way of sending the weights."""
    policy = Policy(PolicyConfig(pretrained="tiny-random-qwen2", lora_r=8, lora_alpha=16, lora_dropout=0.0))
    engine = VLLMEngine(policy, SAMPLING.vllm_kv_cache_gb, SAMPLING.vllm_max_model_len, weight_sync=request.param)
    yield policy, engine
    engine.close()


def engine_logprobs(engine: VLLMEngine, sequences: list[list[int]], start: int) -> torch.Tensor:
    """log π(token_t | tokens_<t), t >= start, under the weights the engine has now (no sync) `[S, len - start]`."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, lora_request=engine.lora,
                              use_tqdm=False)
    return torch.tensor([[o.prompt_logprobs[t][tok].logprob for t, tok in enumerate(s) if t >= start]
                         for o, s in zip(out, sequences)])


def policy_logprobs(policy: Policy, sequences: list[list[int]], start: int) -> torch.Tensor:
    ids = torch.tensor(sequences)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, start:] = True
    with torch.no_grad():
        lp, _ = policy.forward_sequences(ids, torch.ones_like(ids), positions)
    return lp[:, start:]


def test_engine_samples_from_the_updated_policy(policy_and_engine) -> None:
    """After every optimizer step the engine's log-probs of fixed completions equal the policy's (float32, 1e-4);
    before the sync they do not (so the check can fail), and unchanged weights are not sent again. A reset adapter
    brings the engine back to the base model."""
    policy, engine = policy_and_engine
    torch.manual_seed(0)
    seqs = torch.randint(10, policy.tokenizer.vocab_size - 10, (3, 24)).tolist()
    engine.sync(policy)
    assert engine.lora is None  # a fresh adapter: the base model
    assert torch.allclose(engine_logprobs(engine, seqs, 8), policy_logprobs(policy, seqs, 8), atol=1e-4)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-2)
    for step in range(2):
        ids = torch.tensor(seqs)
        lp, _ = policy.forward_sequences(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
        (-lp.sum()).backward()
        opt.step()
        opt.zero_grad()
        stale, now = engine_logprobs(engine, seqs, 8), policy_logprobs(policy, seqs, 8)
        assert (stale - now).abs().max() > 1e-2, step
        assert engine.sync(policy) and not engine.sync(policy)
        assert engine.lora is None if engine.merged else engine.lora.lora_int_id == step + 1
        assert torch.allclose(engine_logprobs(engine, seqs, 8), now, atol=1e-4), step
    base = engine_logprobs(engine, seqs, 8)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert engine.sync(policy) and engine.lora is None
    assert torch.allclose(engine_logprobs(engine, seqs, 8), policy_logprobs(policy, seqs, 8), atol=1e-4)
    assert (engine_logprobs(engine, seqs, 8) - base).abs().max() > 1e-2


def test_engine_rollouts_repeat_under_a_seed(policy_and_engine) -> None:
    """sample_rollouts with the engine: B x G completions in group order, each ending with the marker's ids, the same
    ones under the same seed and other ones under another."""
    policy, engine = policy_and_engine
    prompts = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("I watched Alien and", "Hello")]
    width = max(map(len, prompts))
    ids = torch.tensor([[policy.tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = {"prompt_ids": ids, "prompt_mask": mask, "target": torch.tensor([1, 2]),
             "history": torch.zeros(2, 3, dtype=torch.long)}

    def draw(seed: int):
        reseed(seed, 0)
        return sample_rollouts(policy, batch, SAMPLING, engine=engine)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.completion_ids.shape[0] == 6 and torch.equal(a.target, torch.tensor([1, 1, 1, 2, 2, 2]))
    assert torch.equal(a.completion_ids, b.completion_ids) and not torch.equal(a.completion_ids, c.completion_ids)
    marker = policy.marker_ids
    for row, m in zip(a.completion_ids.tolist(), a.completion_mask.tolist()):
        n = sum(m)
        assert row[n - len(marker) : n] == marker and n <= SAMPLING.max_new_tokens + len(marker) + 1
    # more prompt tokens than one scheduler step takes (8,192): whole prompts wait for the next step, none is split
    long = torch.randint(10, 1000, (24, 400))
    batch = {"prompt_ids": long, "prompt_mask": torch.ones_like(long), "target": torch.ones(24, dtype=torch.long),
             "history": torch.zeros(24, 3, dtype=torch.long)}
    assert draw(0).completion_ids.shape[0] == 72


def test_recpo_learns_with_vllm_rollouts(tmp_path: Path) -> None:
    """The planted-preference learning test of the HF engine (test_grpo) passes with vLLM rollouts."""
    L.seed_everything(0)
    dm, module = make_dm(tmp_path), make_module()
    module.sampling = dataclasses.replace(module.sampling, engine="vllm", vllm_kv_cache_gb=0.25, vllm_max_model_len=512)
    t = trainer(tmp_path, max_steps=20, limit_val_batches=3, enable_checkpointing=False, limit_train_batches=20)
    before = t.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    t.fit(module, datamodule=dm)
    after = t.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg@10"]
    assert after > before + 0.15, (before, after)


def test_killed_fit_with_the_vllm_engine_resumes_to_the_unbroken_result(tmp_path: Path) -> None:
    """tests/scripts/kill_resume.py --engine vllm: a tiny fit killed twice at random steps (the engine restarts with
    each launch and gets the checkpoint's LoRA weights) ends with the unbroken run's weights and validations."""
    done = subprocess.run([sys.executable, str(ROOT / "tests/scripts/kill_resume.py"), "--workdir", str(tmp_path),
                           "--pipeline-kills", "0", "--fit-kills", "2", "--seed", "1", "--engine", "vllm"],
                          capture_output=True, text=True, timeout=1800)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kill_resume: 0 of 2 comparisons differ" in done.stdout
    assert "the run ended first" not in done.stdout


def test_throughput_benchmark_compares_both_engines(import_benchmark, tmp_path: Path) -> None:
    """benchmarks/throughput.py --engines hf vllm vllm-merged: rollout rows for hf and vllm, training-step rows for
    each engine, in one run."""
    bench = import_benchmark("throughput")
    out = tmp_path / "out"
    assert bench.main(["--quick", "--engines", "hf", "vllm", "vllm-merged", "--out", str(out), "--cache_dir",
                       str(tmp_path)]) == 0
    with open(out / "throughput.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    plan = bench.make_plan(quick=True)
    assert not [r for r in rows if (r["measure"], r["engine"]) == ("rollout", "vllm-merged")]
    for engine in ("hf", "vllm", "vllm-merged"):
        rollouts = [r for r in rows if (r["measure"], r["engine"]) == ("rollout", engine)]
        assert engine == "vllm-merged" or [int(r["batch"]) for r in rollouts] == list(plan.rollout_batches)
        assert all(0 < float(r["tokens"]) <= int(r["batch"]) * plan.group * (plan.max_new_tokens + 8) for r in rollouts)
        step = [r for r in rows if (r["measure"], r["engine"]) == ("training step", engine)]
        assert len(step) == 1 and float(step[0]["samples_per_s"]) > 0
