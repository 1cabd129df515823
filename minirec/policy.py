"""The one policy wrapper used by training, scoring and evaluation (METHOD.md §1, §3, §4).

A causal LM with a LoRA adapter (PEFT) that
- generates reasoning that stops at the first answer marker in its text and ends with the marker's own token ids
  (appended when the model never writes the marker), prefilling each prompt once for its G samples, with the LoRA
  update merged into the base weights while it generates,
- scores sequences: per-token log-probs of completion tokens and the user / item embedding, the final-norm hidden state
  at the last token, in one forward pass,
- saves and loads only the LoRA weights (as a state dict for checkpoints, or as a PEFT adapter folder).

With `dtype="auto"` the frozen base weights are bfloat16 where bf16 matmuls are fast (`auto_dtype`); the LoRA weights,
their gradients and optimizer state stay float32, and log-probs / embeddings come out float32.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from minirec.io import ConfigError, DataError, atomic_dir
from minirec.models import load_tokenizer, resolve_pretrained

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def _cpu_flags() -> set[str]:
    """The CPU feature flags listed in Linux /proc/cpuinfo (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.partition(":")[2].split()}


def auto_dtype() -> str:
    """The `dtype="auto"` choice: "bfloat16" on a CUDA device with native bf16 (Ampere or newer) and, without CUDA, on
    a CPU with AMX-BF16 or AVX512-BF16 instructions; "float32" otherwise."""
    if torch.cuda.is_available():
        fast = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        fast = bool(_BF16_CPU_FLAGS & _cpu_flags())
    return "bfloat16" if fast else "float32"


def _upcast(x: Tensor) -> Tensor:
    """Half-precision tensors to float32 (float32 and float64 stay)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def shared_prefix(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Left-padded rows `[R, S]` -> the rows moved to the left `[R, S]` (right-padded), their real lengths `[R]` and
    the number of first tokens all rows share, short of each row's last token."""
    lengths = mask.long().sum(1)
    index = (torch.arange(ids.shape[1], device=ids.device)[None] + (ids.shape[1] - lengths)[:, None]) % ids.shape[1]
    aligned = ids.gather(1, index)
    same = (aligned == aligned[:1]).all(0).long().cumprod(0).sum()  # leading columns equal in every row
    return aligned, lengths, min(int(same), int(lengths.min()) - 1)


def left_padded_positions(mask: Tensor) -> Tensor:
    """Position ids `[R, S]` of left-padded sequences with mask `[R, S]`: real tokens count 0, 1, ...; padding gets 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sdpa_matmul(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' `sdpa` attention, except in half precision on CPU with a mask or a one-token query (decoding):
    there two matmuls around a softmax, each query head group against its key / value head, are faster than
    PyTorch's CPU flash kernel (SmolLM2 in bfloat16, per layer call: decoding 16 rows over 300 cached tokens 0.39 ms
    against 0.56 ms with a padding mask and 3.4 ms without one, where transformers passes `enable_gqa`; a RecPO
    update's forward + backward over 4 x 328 tokens with its 4-D mask 16 ms against 31-37 ms).

    query `[B, Hq, Q, D]`, key / value `[B, Hkv, S, D]` (query head h reads key / value head h // (Hq / Hkv)),
    attention_mask None, bool `[B, 1, Q, S]` (True = attend) or additive -> output `[B, Q, Hq, D]`. A query that may
    attend nothing (left padding) averages the values instead of giving NaN.
    """
    if (query.device.type != "cpu" or query.dtype == torch.float32 or kwargs.get("softcap") or kwargs.get("dropout")
            or (attention_mask is None and query.shape[2] != 1)
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    (b, hq, q, d), hkv = query.shape, key.shape[1]
    scores = torch.matmul(query.reshape(b, hkv, hq // hkv * q, d), key.transpose(2, 3))  # [B, Hkv, Hq/Hkv·Q, S]
    scores = scores.view(b, hkv, hq // hkv, q, -1) * (d**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[:, :, None]  # [B, 1, 1, Q, S]: the same for every head
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask)
    probs = scores.softmax(-1).to(value.dtype).view(b, hkv, hq // hkv * q, -1)
    out = torch.matmul(probs, value)  # [B, Hkv, Hq/Hkv·Q, D]
    return out.view(b, hq, q, d).transpose(1, 2), None


AttentionInterface.register("sdpa_matmul", sdpa_matmul)
AttentionMaskInterface.register("sdpa_matmul", sdpa_mask)


def sampling_candidates(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor | None]:
    """Next-token logits `[R, V]` -> the distribution HF's sampling warpers give (temperature, then top-k, then
    top-p, in HF's order and arithmetic) as probabilities over each row's candidates `[R, C]` and their token ids
    `[R, C]` (None: the candidates are the whole vocabulary, C = V). With top-k the candidates are the k highest
    logits and every token tied with the k-th (HF keeps those too), so a draw takes k random numbers instead of V:
    `torch.multinomial` draws one exponential per entry, 16 ms per decoding step of 16 rows over SmolLM2's 49,152
    tokens."""
    if temperature != 1.0:
        logits = logits / temperature
    ids = None
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [R, 1]
        keep = int((logits >= kth).sum(-1).max())  # top_k, or more where tokens tie with the k-th
        logits, ids = logits.topk(keep, dim=-1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits.softmax(-1), ids


def lora_in_base_dtype(decoder: torch.nn.Module) -> None:
    """Compute the LoRA layers of `decoder`, whose base weights are half precision, in that precision: its forward
    runs under autocast, which casts each float32 LoRA weight once per call (the weights, their gradients and the
    optimizer stay float32), where PEFT casts every LoRA input to float32 and the sum back (SmolLM2 in bfloat16, a
    RecPO update's forward + backward over 4 x 328 tokens: 4.1-5.3 s -> 3.3-3.9 s in one run, alternated)."""
    dtype = next(decoder.parameters()).dtype
    for module in decoder.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
    forward = decoder.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(next(decoder.parameters()).device.type, dtype=dtype):
            return forward(*args, **kwargs)

    decoder.forward = autocast_forward


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run the block with `module` in eval mode (no dropout), then restore its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys / values `[R, Hkv, S, D]` are views of buffers `[R, Hkv, capacity, D]` allocated
    once: `update` writes the new positions in place where `DynamicLayer` concatenates (a new allocation and a copy of
    the whole cache per layer per step; SmolLM2 on a CPU decodes 1.08-1.24x faster without them). Same values, so
    the same attention. Only what decoding uses is kept consistent (`update` and the views), not `crop` and the like."""

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.buffers = [x.new_empty((*x.shape[:2], capacity, x.shape[3])) for x in (keys, values)]
        self.keys, self.values = (b[:, :, :0] for b in self.buffers)
        self.update(keys, values)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, start:end] = new
        self.keys, self.values = (b[:, :, :end] for b in self.buffers)
        return self.keys, self.values


def preallocate(cache: DynamicCache, repeats: int, new_tokens: int) -> None:
    """Repeat a prefilled cache `repeats` times per row (`batch_repeat_interleave`: row b -> rows b·repeats ..
    b·repeats+repeats-1), then move its full-attention layers into `PreallocatedLayer`s with room for `new_tokens`
    more positions (other layers, e.g. sliding-window ones, keep their own update)."""
    cache.batch_repeat_interleave(repeats)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, layer.keys.shape[-2] + new_tokens)


class MarkerStop(StoppingCriteria):
    """Stops a row once the text of its generated tokens (after the first `prompt_len` columns) contains `marker`.

    Matches text, not token ids: inside text the marker tokenizes differently (" <answer>" is [' <', 'answer', '>'],
    "<answer>" alone ['<', 'answer', '>']). Checked every step, so a new marker ends in the newest token; only the
    last len(marker in UTF-8) + 2 tokens are decoded (each token holds at least one byte of text).
    """

    def __init__(self, tokenizer, marker: str, prompt_len: int) -> None:
        self.tokenizer, self.marker, self.prompt_len = tokenizer, marker, prompt_len
        self.tail = len(marker.encode()) + 2

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        """input_ids `[R, L]` -> done `[R]` (bool)."""
        start = max(self.prompt_len, input_ids.shape[1] - self.tail)
        texts = self.tokenizer.batch_decode(input_ids[:, start:].tolist())
        return torch.tensor([self.marker in t for t in texts], dtype=torch.bool, device=input_ids.device)


def finish_completion(tokens: Sequence[int], tokenizer, marker: str, stop_ids: set[int]) -> list[int]:
    """Generated token ids -> the completion, which always ends with the marker's own ids
    (`tokenizer(marker, add_special_tokens=False)`) and holds nothing after them.

    Cut at the first stop (EOS) token, then at the first occurrence of the marker TEXT in the decoded tokens: the
    tokens whose text lies wholly before the marker are kept as generated, the text between them and the marker (the
    space of ' <', the '.' of '.<') is re-encoded, and the marker ids follow. So the completion decodes to exactly
    the generated text up to and including its first marker, whitespace before the marker kept. Without a marker, the
    marker ids are appended.
    """
    tokens = list(tokens)[: next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(tokens)
    at = text.find(marker)
    if at < 0:
        return tokens + marker_ids
    before, k = text[:at], len(tokens)
    while not before.startswith(head := tokenizer.decode(tokens[:k])):  # k = 0 decodes to "" and ends the loop
        k -= 1
    rest = before[len(head) :]
    return tokens[:k] + (tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []) + marker_ids


class Policy(torch.nn.Module):
    """Causal LM + LoRA (PEFT) with generate / encode / token log-probs, built from a `PolicyConfig`.

    Starts in eval mode, like `from_pretrained`; Lightning switches it to train mode for fitting.
    """

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or PolicyConfig()
        if c.dtype not in (*_DTYPES, "auto"):
            raise ConfigError(f"model.dtype={c.dtype!r}: expected one of {', '.join(_DTYPES)}, auto")
        if c.logprob_chunk_size < 1:
            raise ConfigError(f"model.logprob_chunk_size={c.logprob_chunk_size}: must be >= 1")
        if c.item_encoder not in ("policy", "base"):
            raise ConfigError(f"model.item_encoder={c.item_encoder!r}: expected 'policy' or 'base'")
        path = resolve_pretrained(c.pretrained)
        self.tokenizer = load_tokenizer(path)
        self.answer_marker = c.answer_marker
        self.marker_ids: list[int] = self._marker_ids(c.answer_marker)
        try:
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=_DTYPES[auto_dtype() if c.dtype == "auto" else c.dtype],
                attn_implementation=c.attn_implementation,
            )
        except ValueError as e:
            if "attention implementation" not in str(e) and "attn_implementation" not in str(e):
                raise
            raise ConfigError(f"model.attn_implementation={c.attn_implementation!r} is not supported by "
                            f"{c.pretrained!r}; use 'eager'") from None
        if c.attn_implementation == "sdpa":
            base.set_attn_implementation("sdpa_matmul")  # sdpa, faster on CPU in half precision
        if c.adapter_path is not None:
            if not (Path(c.adapter_path) / "adapter_config.json").is_file():
                raise ConfigError(f"model.adapter_path={c.adapter_path!r}: no adapter_config.json (not a PEFT adapter)")
            self.model = PeftModel.from_pretrained(base, c.adapter_path, is_trainable=True, autocast_adapter_dtype=True)
        else:
            lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                              target_modules=list(c.lora_target_modules), task_type="CAUSAL_LM")
            try:
                self.model = get_peft_model(base, lora, autocast_adapter_dtype=True)  # LoRA weights in float32
            except ValueError as e:
                raise ConfigError(f"model.lora_target_modules={list(c.lora_target_modules)}: {e}") from None
        if base.dtype in (torch.bfloat16, torch.float16):
            lora_in_base_dtype(base.get_decoder())
        if c.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.hidden_size: int = base.config.hidden_size
        self._softcap: float | None = getattr(base.config, "final_logit_softcapping", None)
        self.logprob_chunk_size = c.logprob_chunk_size
        self.eval()

    def _marker_ids(self, marker: str) -> list[int]:
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
        if not ids or self.tokenizer.decode(ids) != marker:
            raise ConfigError(f"model.answer_marker={marker!r}: the tokenizer cannot represent it (empty or no round "
                            "trip through encode/decode)")
        if set(ids) & set(self.tokenizer.all_special_ids):
            raise ConfigError(f"model.answer_marker={marker!r}: must be plain text, not a special token")
        return ids

    @property
    def stop_ids(self) -> set[int]:
        """EOS ids of the tokenizer and the model's generation config."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_samples: int = 1,
        do_sample: bool = True,
        temperature: float = 1.5,
        top_k: int = 200,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Sample `num_samples` completions per left-padded prompt `[B, P]`, each ending with the first marker.

        Returns completion_ids `[B x G, T]` right-padded with the pad token (row b*G+g is sample g of prompt b) and
        completion_mask `[B x G, T]`, T <= max_new_tokens + len(marker ids) (plus the text re-encoded before a marker
        that starts inside a token, usually one token; see `finish_completion`). Sampling prefills each prompt once for
        its G samples (`_sample`); greedy when `do_sample` is False (HF generate, decoded once per prompt, repeated G
        times). Runs in eval mode (no dropout) with the adapter merged (`merged_adapter`) and restores both; seed with
        `torch.manual_seed` for reproducible samples.
        """
        with eval_mode(self), self.merged_adapter():
            if do_sample:
                out = self._sample(input_ids, attention_mask, num_samples, temperature, top_k, top_p, max_new_tokens)
            else:
                out = self._greedy(input_ids, attention_mask, max_new_tokens).repeat_interleave(num_samples, dim=0)
        return self.completions(out[:, input_ids.shape[1] :].tolist(), input_ids.device)

    def _greedy(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                cache: DynamicCache | None = None) -> Tensor:
        """HF greedy `generate` of left-padded prompts `[B, P]` -> prompts + reasoning `[B, P + T]`, stopping at an
        EOS token or the marker (`MarkerStop`); `cache` may hold the prompts' first tokens (generate runs the rest)."""
        stop = MarkerStop(self.tokenizer, self.answer_marker, input_ids.shape[1])
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_ids), bos_token_id=self.tokenizer.bos_token_id, use_cache=True,
            repetition_penalty=1.0,  # a hub generation_config's penalty would otherwise apply
        )
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                   stopping_criteria=StoppingCriteriaList([stop]), past_key_values=cache)

    @torch.no_grad()
    def reason_and_encode(self, input_ids: Tensor, attention_mask: Tensor,
                          max_new_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy reasoning and the user embeddings after it, for left-padded prompts `[B, P]`: what `generate(...,
        do_sample=False)` then `encode` of the joined rows give (up to float rounding), with each prompt run once.
        The KV cache of all but the prompts' last token (eval mode, adapter unmerged, as `encode` runs) serves the
        greedy decoding (on a copy; adapter merged, as `generate` runs) and then the embedding pass, which runs only
        each row's last prompt token and completion after it. Under ZeRO-3, or for a prompt of one token, it runs
        `generate` and `encode`. Returns (embeddings `[B, H]` at least fp32, completion_ids, completion_mask `[B, T]`).
        """
        decoder = self.model.get_base_model().get_decoder()
        if self._partitioned() or not bool(attention_mask[:, -2:].all()):
            comp, comp_mask = self.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=max_new_tokens)
            return self.encode(*self.join(input_ids, attention_mask, comp, comp_mask)[:2]), comp, comp_mask
        positions = left_padded_positions(attention_mask)
        with eval_mode(self):
            cache = decoder(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                            position_ids=positions[:, :-1], use_cache=True).past_key_values
            with self.merged_adapter():
                out = self._greedy(input_ids, attention_mask, max_new_tokens, copy.deepcopy(cache))
            comp, comp_mask = self.completions(out[:, input_ids.shape[1] :].tolist(), input_ids.device)
            rest = torch.cat([input_ids[:, -1:], comp], dim=1)  # [B, 1 + T]: the last prompt token, the completion
            rest_positions = positions[:, -1:] + torch.arange(rest.shape[1], device=rest.device)
            hidden = decoder(input_ids=rest, attention_mask=torch.cat([attention_mask, comp_mask], dim=1),
                             position_ids=rest_positions, past_key_values=cache, use_cache=True).last_hidden_state
        last = comp_mask.sum(1)  # the last completion token's column in `rest`
        return _upcast(hidden[torch.arange(rest.shape[0], device=rest.device), last]), comp, comp_mask

    def completions(self, generated: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """Generated token lists (from any engine; padding and anything after an EOS or the first marker ignored) ->
        completion_ids `[R, T]` right-padded with the pad token and completion_mask `[R, T]`, each row ending with the
        marker's own ids (`finish_completion`)."""
        pad = self.tokenizer.pad_token_id
        cut = self.stop_ids | {pad}  # generate pads the rows that stopped early
        rows = [finish_completion(r, self.tokenizer, self.answer_marker, cut) for r in generated]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(device), mask.to(device)

    def _sample(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_samples: int,
        temperature: float,
        top_k: int,
        top_p: float,
        max_new_tokens: int,
    ) -> Tensor:
        """Prompts `[B, P]` -> prompts + sampled tokens `[B x G, P + T]`, T <= max_new_tokens, rows that stopped
        (an EOS token or the marker, `MarkerStop`) padded with the pad token; row b*G+g is sample g of prompt b.

        One prefill over the B prompts; its KV cache (into buffers with room for the new tokens: `preallocate`) and
        last logits are repeated G times, then B x G rows decode one token per step. Otherwise the steps of HF
        `generate(do_sample=True, num_return_sequences=G)` (which prefills every prompt G times): the same positions
        and masks (none without padding), the distribution of HF's warpers (`sampling_candidates`), one
        `torch.multinomial` over all rows per step. So a seed draws the samples of the plain path: without top-k
        HF's own; with top-k (drawn among the candidates) those of this loop over the prompts repeated G times.
        """
        hf = self.model.get_base_model()
        stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=input_ids.device)
        stop = MarkerStop(self.tokenizer, self.answer_marker, input_ids.shape[1])
        mask = None if attention_mask.all() else attention_mask
        positions = left_padded_positions(attention_mask)
        # the last position as an index: `logits_to_keep=1` slices a non-contiguous [B, 1, H] view, for which the
        # half-precision CPU lm_head matmul copies its [V, H] weight once per row (SmolLM2 in bfloat16, 16 prompts:
        # a 0.62 s copy and a 0.15 s batched matmul per prefill, profiled); the index makes a contiguous copy of the
        # B hidden states (the same logits in bfloat16; in float32 equal within rounding, 4e-5 here).
        last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        out = hf(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=last)
        cache = out.past_key_values
        preallocate(cache, num_samples, max_new_tokens)
        logits = out.logits[:, -1].float().repeat_interleave(num_samples, dim=0)  # [BG, V]
        seqs = input_ids.repeat_interleave(num_samples, dim=0)
        mask = None if mask is None else mask.repeat_interleave(num_samples, dim=0)
        positions = positions[:, -1:].repeat_interleave(num_samples, dim=0)  # [BG, 1]
        running = torch.ones(seqs.shape[0], dtype=torch.bool, device=seqs.device)
        for step in range(max_new_tokens):
            probs, candidates = sampling_candidates(logits, temperature, top_k, top_p)
            new = torch.multinomial(probs, 1)
            new = (new if candidates is None else candidates.gather(1, new)).squeeze(1)
            new = new.masked_fill(~running, self.tokenizer.pad_token_id)
            seqs = torch.cat([seqs, new[:, None]], dim=1)
            running &= ~(torch.isin(new, stops) | stop(seqs, None))
            if step + 1 == max_new_tokens or not running.any():
                break
            mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions + 1
            logits = hf(input_ids=new[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True).logits[:, -1].float()
        return seqs

    def join(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt `[R, P]` (left-padded) + completion `[R, T]` (right-padded) -> one left-padded sequence per row.

        Returns input_ids `[R, P+T]`, attention_mask `[R, P+T]` (long) and completion_positions `[R, P+T]` (bool, True
        on the completion's tokens: the log-prob targets).
        """
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        real = torch.cat([prompt_mask, completion_mask], dim=1).bool()
        comp = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), completion_mask.bool()], dim=1)
        order = torch.argsort(real.long(), dim=1, stable=True)  # padding first, real tokens after in their order
        real, comp = real.gather(1, order), comp.gather(1, order)
        ids = ids.gather(1, order).masked_fill(~real, self.tokenizer.pad_token_id)
        return ids, real.long(), comp & real

    def forward_sequences(
        self, input_ids: Tensor, attention_mask: Tensor, completion_positions: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor]:
        """One forward pass over left-padded sequences `[R, S]`.

        Returns (logps, embeddings), both at least fp32: logps `[R, S]` with log π(token_t | tokens_<t) at completion
        positions and 0 elsewhere (None when `completion_positions` is None), computed in chunks of positions through
        lm_head so the full `[R, S, V]` logits never exist; embeddings `[R, H]`, the final-norm hidden state at the
        last token. Positions count real tokens only (cumsum of the mask - 1), as in `generate`, so left padding does
        not change the result.
        """
        if not bool(attention_mask[:, -1].all()):
            raise DataError("forward_sequences: attention_mask must be left-padded (last position real in every row)")
        hf = self.model.get_base_model()
        position_ids = left_padded_positions(attention_mask)
        hidden = hf.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [R, S, H], after the final norm
        embeddings = _upcast(hidden[:, -1])
        if completion_positions is None:
            return None, embeddings
        targets = completion_positions.bool().clone()
        targets[:, 0] = False  # the first token has no preceding logits
        vals = self._token_logprobs(hidden[:, :-1][targets[:, 1:]], input_ids[:, 1:][targets[:, 1:]])
        logps = vals.new_zeros(input_ids.shape).masked_scatter(targets, vals)
        return logps, embeddings

    def forward_groups(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One forward pass over prompts `[B, P]` (left-padded) and their n = R / B completions each `[R, T]`
        (right-padded; rows b·n .. b·n+n-1 continue prompt b), with each prompt's tokens run once.

        Row b of the pass is prompt b followed by its n completions, `[P + n·T]`; a 4-D attention mask lets each
        completion see the prompt and itself only, and its positions continue the prompt's, so every completion
        gets what `forward_sequences` gives it on the joined sequence (up to float rounding), gradient included,
        for P + n·T tokens instead of n·(P + T). Works with gradient checkpointing (no KV cache is involved).

        Returns logps `[R, T]` (log π of each completion token, 0 on padding) and embeddings `[R, H]`, the
        final-norm hidden state at each row's last completion token; both at least fp32.
        """
        if not bool(prompt_mask[:, -1].all()):
            raise DataError("forward_groups: prompt_mask must be left-padded (last position real in every row)")
        if not bool(completion_mask[:, 0].all()):
            raise DataError("forward_groups: every completion needs at least one token (the marker)")
        (b, p), (r, t) = prompt_ids.shape, completion_ids.shape
        n = r // b
        ids = torch.cat([prompt_ids, completion_ids.reshape(b, n * t)], dim=1)  # [B, L], L = P + n·T
        real = torch.cat([prompt_mask.bool(), completion_mask.bool().reshape(b, n * t)], dim=1)
        segment = torch.arange(n, device=ids.device).repeat_interleave(t)  # completion index of each position
        segment = torch.cat([segment.new_full((p,), -1), segment])  # -1: the prompt
        index = torch.arange(p + n * t, device=ids.device)
        sees = (index[None, :] <= index[:, None]) & ((segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
        allowed = sees[None] & real[:, None, :]  # [B, L, L]: query i may attend key j
        dtype = self.model.get_input_embeddings().weight.dtype  # the hidden states' dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(~allowed, torch.finfo(dtype).min)
        prompt_len = prompt_mask.long().sum(1, keepdim=True)  # [B, 1]
        positions = torch.cat([left_padded_positions(prompt_mask),
                               (prompt_len + torch.arange(t, device=ids.device)).repeat(1, n)], dim=1)
        hidden = self.model.get_base_model().get_decoder()(
            input_ids=ids, attention_mask=mask[:, None], position_ids=positions, use_cache=False
        ).last_hidden_state  # [B, L, H], after the final norm
        comp_hidden = hidden[:, p:].reshape(r, t, -1)  # [R, T, H]
        before = torch.cat([hidden[:, p - 1 : p].repeat_interleave(n, dim=0), comp_hidden[:, :-1]], dim=1)  # predicts
        real_comp = completion_mask.bool()
        vals = self._token_logprobs(before[real_comp], completion_ids[real_comp])
        logps = vals.new_zeros(completion_ids.shape).masked_scatter(real_comp, vals)
        last = completion_mask.long().sum(1) - 1
        return logps, _upcast(comp_hidden[torch.arange(r, device=ids.device), last])

    def _token_logprobs(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Hidden states `[N, H]` of the positions before the targets `[N]` -> log-probs `[N]`, in chunks; with
        grad enabled each chunk is checkpointed so backward recomputes its logits instead of storing them (not under
        DeepSpeed ZeRO-3, whose partitioned LM-head weight is gone by the time the recompute runs)."""
        out = []
        head = self.model.get_base_model().get_output_embeddings().weight
        recompute = torch.is_grad_enabled() and not hasattr(head, "ds_id")  # ds_id: a ZeRO-3 partitioned parameter
        for h, t in zip(hidden.split(self.logprob_chunk_size), targets.split(self.logprob_chunk_size)):
            if recompute and h.requires_grad:
                out.append(checkpoint(self._chunk_logprobs, h, t, use_reentrant=False))
            else:
                out.append(self._chunk_logprobs(h, t))
        return torch.cat(out) if out else _upcast(hidden.new_zeros(0))

    def _chunk_logprobs(self, hidden: Tensor, targets: Tensor) -> Tensor:
        logits = _upcast(self.model.get_base_model().get_output_embeddings()(hidden))  # [n, V]
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")  # log-softmax at the targets

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embeddings `[R, H]` of left-padded sequences `[R, S]` (users after reasoning, or items). The tokens every row
        starts with (a chat template's system prompt and instruction: 42 of the 74 tokens of a SmolLM2 MovieLens item
        prompt) run once and their KV cache serves all rows (`_encode_after_prefix`), with or without gradient; not
        while dropout is active (each row's prefix would then share one dropout mask), with gradient checkpointing in
        training mode (transformers then drops the cache) or under ZeRO-3 (whose ranks must run the same forward
        passes). Input that is not left-padded goes to `forward_sequences`, which refuses it."""
        shareable = input_ids.shape[0] > 1 and bool(attention_mask[:, -1].all())  # several left-padded rows
        if shareable and not (self._partitioned() or (self.model.training and (self.config.gradient_checkpointing
                                                                               or self._dropout_active()))):
            aligned, lengths, prefix = shared_prefix(input_ids, attention_mask)
            if prefix > 0:
                return self._encode_after_prefix(aligned, lengths, prefix)
        return self.forward_sequences(input_ids, attention_mask)[1]

    def _partitioned(self) -> bool:
        """Whether the weights are ZeRO-3 partitioned (`ds_id`): every rank must then run the same forward passes."""
        return hasattr(self.model.get_base_model().get_input_embeddings().weight, "ds_id")

    def _dropout_active(self) -> bool:
        """Whether a forward pass in training mode draws dropout (LoRA or the model's own, probability above 0)."""
        return getattr(self.model.get_base_model().config, "attention_dropout", 0.0) > 0 or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules())

    def _encode_after_prefix(self, aligned: Tensor, lengths: Tensor, prefix: int) -> Tensor:
        """Embeddings `[R, H]` of the right-padded rows `aligned` `[R, S]` (real lengths `[R]`) whose first `prefix`
        tokens are the same: those run once (1 row), their KV cache is repeated for the R rows, and the rest of each
        row runs after it at positions `prefix`, `prefix` + 1, ... The same numbers as the full forward up to float
        rounding (the prefix's keys and values do not depend on what follows them); with gradient, each row's gradient
        reaches the prefix through the repeated cache."""
        decoder = self.model.get_base_model().get_decoder()
        rows, width = aligned.shape[0], int(lengths.max())
        positions = torch.arange(width, device=aligned.device)[None]
        cache = decoder(input_ids=aligned[:1, :prefix], position_ids=positions[:, :prefix],
                        use_cache=True).past_key_values
        cache.batch_repeat_interleave(rows)
        mask = (positions < lengths[:, None]).long()  # [R, width]: right padding
        hidden = decoder(input_ids=aligned[:, prefix:width], attention_mask=mask, past_key_values=cache,
                         position_ids=positions[:, prefix:].expand(rows, -1), use_cache=True).last_hidden_state
        return _upcast(hidden[torch.arange(rows, device=aligned.device), lengths - prefix - 1])

    def adapter_is_identity(self) -> bool:
        """True while every LoRA B matrix is zero (a fresh adapter): the model then computes exactly what the base
        model does. False when a matrix is not held here (a partitioned ZeRO-3 parameter)."""
        lora_b = [p for n, p in self.model.named_parameters() if "lora_B" in n]
        return bool(lora_b) and all(p.numel() > 0 and not p.any() for p in lora_b)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The LoRA (trainable) weights only, by parameter name (detached, sharing storage with the parameters)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _lora_layers(self) -> dict[str, LoraLayer]:
        """The LoRA-wrapped linear layers, by their name in the base model."""
        return {n: m for n, m in self.model.get_base_model().named_modules() if isinstance(m, LoraLayer)}

    @torch.no_grad()
    def _merged_weight(self, layer: LoraLayer) -> Tensor:
        """A LoRA-wrapped layer's weight + LoRA update `[out, in]`, in the base weight's dtype."""
        w = layer.base_layer.weight
        return (w.float() + layer.get_delta_weight(self.model.active_adapter).float()).to(w.dtype)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The base model's state dict with the adapter merged, without touching this model: every tensor under the
        base model's own names (`model.layers.0.self_attn.q_proj.weight`), each LoRA-wrapped linear layer's weight
        `[out, in]` as weight + LoRA update, in the base weights' dtype."""
        state = {k.replace(".base_layer.", "."): v.detach()
                 for k, v in self.model.get_base_model().state_dict().items() if "lora_" not in k}
        return state | {f"{name}.weight": self._merged_weight(m) for name, m in self._lora_layers().items()}

    @contextmanager
    def merged_adapter(self) -> Iterator[None]:
        """Run the block with the LoRA update added into the base weights and the adapter off: the same model without
        the per-layer LoRA matmuls, 10-17 % of a SmolLM2 generation on CPU in bfloat16. The base weights are
        copied first and restored bit for bit afterwards. The identity adapter (a fresh one) is only turned off: it
        adds exact zeros. Nothing changes while the adapter is off, or under ZeRO-3 (partitioned weights)."""
        layers = list(self._lora_layers().values())
        if not layers or any(m.disable_adapters or m.merged or hasattr(m.base_layer.weight, "ds_id") for m in layers):
            yield
            return
        if self.adapter_is_identity():
            with self.model.disable_adapter():
                yield
            return
        saved = [m.base_layer.weight.detach().clone() for m in layers]
        try:
            with torch.no_grad():
                for m in layers:
                    m.base_layer.weight.copy_(self._merged_weight(m))
            with self.model.disable_adapter():
                yield
        finally:
            with torch.no_grad():
                for m, w in zip(layers, saved):
                    m.base_layer.weight.copy_(w)

    def load_trainable_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy LoRA weights from `trainable_state_dict()` output; names and shapes must match exactly."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(params.keys() - state_dict.keys()), sorted(state_dict.keys() - params.keys())
        if missing or unexpected:
            raise DataError(f"LoRA state dict does not match the model: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]} (different model.pretrained or lora_target_modules?)")
        for n, p in params.items():
            if p.shape != state_dict[n].shape:
                raise DataError(f"LoRA weight {n}: shape {tuple(state_dict[n].shape)} != {tuple(p.shape)} "
                                "(different model.lora_r?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state_dict[n])

    def save_adapter(self, folder: str | Path) -> None:
        """Write the LoRA adapter in the PEFT layout, atomically; `PeftModel.from_pretrained(base, folder)` opens it."""
        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp)


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of a `Policy`.

    Args:
        pretrained: a preset name (`minirec.models.PRESETS`), a local model folder or a hub id.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input (active in training mode only).
        lora_target_modules: names of the linear layers that get LoRA.
        dtype: dtype of the frozen base weights, "float32", "bfloat16", "float16" or "auto" (`auto_dtype`); the LoRA
            weights are float32 whatever it is.
        attn_implementation: "sdpa" (runs as `sdpa_matmul`), "eager" (supports double backward through
            attention on CPU) or any other implementation transformers accepts.
        gradient_checkpointing: recompute layer activations in backward (non-reentrant) to save memory.
        answer_marker: text that ends the reasoning; its last token's hidden state is the embedding.
        adapter_path: a PEFT adapter folder (from `save_adapter`) to start from, loaded trainable; the `lora_*`
            settings are then taken from that adapter.
        logprob_chunk_size: completion positions per lm_head / log-softmax chunk (bounds the fp32 logits memory).
        item_encoder: what encodes the items users are ranked against: "policy" (the method's: the model being
            trained, so item embeddings move with the adapter) or "base" (the base model with the adapter off, encoded
            once and fixed: only user embeddings learn, and the pretrained model's item space is kept).
    """

    pretrained: str = "tiny-random-qwen2"
    lora_r: int = 4
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    answer_marker: str = "<answer>"
    adapter_path: str | None = None
    logprob_chunk_size: int = 1024
    item_encoder: str = "policy"
