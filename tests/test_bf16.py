"""bfloat16 base weights with float32 LoRA: `dtype="auto"`, and agreement with float32 of log-probs, embeddings, one
AdamW update and the LoRA-space Hessian-vector product; the half-precision CPU attention; LoRA computed in bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import minirec.policy
from minirec.policy import Policy, PolicyConfig, auto_dtype, sdpa_matmul
from minirec.representativeness import parameter_space_vector

TEXT = "I liked [Abbey Road] and [Kind of Blue]."
COMPLETION = "You like classic albums, so I recommend Revolver.<answer>"


def sequence(policy: Policy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chat prompt + a fixed completion, joined: ids, mask, completion positions `[1, S]`."""
    enc = policy.tokenizer.apply_chat_template([[{"role": "user", "content": TEXT}]], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    comp = policy.tokenizer([COMPLETION], add_special_tokens=False, return_tensors="pt")
    return policy.join(enc["input_ids"], enc["attention_mask"], comp["input_ids"], comp["attention_mask"])


def pair(pretrained: str, lora_scale: float, **kwargs) -> tuple[Policy, Policy]:
    """float32 and bfloat16 policies with the same LoRA weights: PEFT's init (B = 0) or, with `lora_scale` > 0, seeded
    N(0, lora_scale²) weights."""
    full = Policy(PolicyConfig(pretrained, lora_dropout=0.0, **kwargs))
    if lora_scale:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in full.trainable_state_dict().values():
                p.copy_(torch.randn(p.shape, generator=gen) * lora_scale)
    half = Policy(PolicyConfig(pretrained, lora_dropout=0.0, dtype="bfloat16", **kwargs))
    half.load_trainable_state_dict(full.trainable_state_dict())
    return full, half


def lora(policy: Policy) -> list[torch.Tensor]:
    return [p for p in policy.model.parameters() if p.requires_grad]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_auto_dtype_follows_device_and_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, expected in [({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                            ({"avx512f", "avx2"}, "float32"), (set(), "float32")]:
        monkeypatch.setattr(minirec.policy, "_cpu_flags", lambda flags=flags: flags)
        assert auto_dtype() == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert auto_dtype() == ("bfloat16" if native else "float32")


def test_auto_bfloat16_keeps_lora_and_optimizer_state_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(minirec.policy, "_cpu_flags", lambda: {"avx512_bf16"})
    policy = Policy(PolicyConfig("tiny-random-llama", dtype="auto"))
    frozen = [p for p in policy.model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and {p.dtype for p in lora(policy)} == {torch.float32}
    ids, mask, comp = sequence(policy)
    policy.train()
    logps, emb = policy.forward_sequences(ids, mask, comp)
    assert logps.dtype == emb.dtype == torch.float32
    opt = torch.optim.AdamW(lora(policy), lr=1e-3)
    (emb.sum() - logps.sum()).backward()
    opt.step()
    assert all(p.grad.dtype == torch.float32 for p in lora(policy))
    assert {s.dtype for state in opt.state.values() for s in (state["exp_avg"], state["exp_avg_sq"])} == {torch.float32}
    monkeypatch.setattr(minirec.policy, "_cpu_flags", lambda: set())
    base = Policy(PolicyConfig("tiny-random-llama", dtype="auto")).model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.float32


# Measured (bfloat16 vs float32, one chat prompt + a 13-token completion): mean |Δ log-prob| (max; mean |log-prob|),
# embedding cosine, cosine of the LoRA gradients and of the first AdamW update (lr 1e-4):
#   tiny-random-qwen2 (LoRA N(0, 0.05²)): 0.0025 (0.0066; 10.9), 0.99989, 0.99976, 0.989
#   smollm2-135m-instruct (PEFT init):    0.057  (0.15;   5.6),  0.99995, 0.99876, 0.968
@pytest.mark.parametrize("pretrained, lora_scale, max_logp_diff", [
    ("tiny-random-qwen2", 0.05, 0.01),
    ("smollm2-135m-instruct", 0.0, 0.15),
])
def test_bfloat16_matches_float32(pretrained, lora_scale, max_logp_diff):
    full, half = pair(pretrained, lora_scale)
    c = torch.randn(full.hidden_size, generator=torch.Generator().manual_seed(1)) / full.hidden_size**0.5
    out = []
    for policy in (full, half):
        ids, mask, comp = sequence(policy)
        logps, emb = policy.forward_sequences(ids, mask, comp)
        (-logps.sum() / comp.sum() + (emb @ c).mean()).backward()
        grad, before = flat(p.grad for p in lora(policy)), flat(lora(policy)).clone()
        torch.optim.AdamW(lora(policy), lr=1e-4).step()
        out.append((logps[comp].detach(), emb.detach(), grad, flat(lora(policy)) - before))
    (lp_f, emb_f, grad_f, step_f), (lp_h, emb_h, grad_h, step_h) = out
    assert (lp_f - lp_h).abs().mean() < max_logp_diff
    assert cosine(emb_f, emb_h) > 0.99
    assert cosine(grad_f, grad_h) > 0.99
    assert cosine(step_f, step_h) > 0.9


def test_bfloat16_hessian_vector_product():
    """Double backward through eager attention works with a bfloat16 base: the H·g vector of
    `parameter_space_vector(hvp=True)` (as in scoring) is finite and points where float32's does (measured: cosine
    0.9996, norm ratio 1.03; smollm2-135m-instruct with PEFT init, two prompts: 0.88, 1.17)."""
    full, half = pair("tiny-random-llama", 0.05, attn_implementation="eager")
    c = torch.randn(full.hidden_size, generator=torch.Generator().manual_seed(1)) / full.hidden_size**0.5
    vectors = []
    for policy in (full, half):
        ids, mask, comp = sequence(policy)
        logps, emb = policy.forward_sequences(ids, mask, comp)
        vectors.append(parameter_space_vector(-logps.sum() / comp.sum() + (emb @ c).mean(), lora(policy), hvp=True))
    assert vectors[1].dtype == torch.float32 and torch.isfinite(vectors[1]).all()
    assert cosine(*vectors) > 0.98 and 0.8 < vectors[1].norm() / vectors[0].norm() < 1.25


class Heads(torch.nn.Module):
    """The attributes transformers' attention functions read from an attention layer: 6 query heads, 2 key / value."""

    num_key_value_groups, is_causal = 3, True


@pytest.mark.parametrize("queries", [1, 10])
def test_matmul_attention_matches_sdpa(queries):
    """`sdpa_matmul` on bfloat16 queries (one decoding token, or 10 with a causal mask) with grouped key / value
    heads: what float32 SDPA gives, forward and backward, with a padding mask (bool or additive); with no mask one
    token attends everything; anything else is transformers' sdpa unchanged."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for shape in [(3, 6, queries, 8), (3, 2, 10, 8), (3, 2, 10, 8)])
    keep = torch.ones(3, 1, queries, 10, dtype=torch.bool).tril(10 - queries)  # causal: query i sees keys <= its own
    keep[0, ..., :4], keep[2, ..., :1] = False, False  # left padding of rows 0 and 2
    rows = keep.any(-1, keepdim=True).transpose(1, 2)  # [3, Q, 1, 1]: queries that attend something (not padding)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    grad = torch.randn(3, queries, 6, 8, generator=gen)
    outs = []
    for mask in [keep, additive] + ([None] if queries == 1 else []):
        ref_mask = None if mask is None else keep
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=ref_mask, enable_gqa=True).transpose(1, 2)
        (ref * grad * rows).sum().backward()
        halves = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        out, _ = sdpa_matmul(Heads(), *halves, mask, scaling=8**-0.5)
        assert out.shape == (3, queries, 6, 8) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert ((out.float() - ref) * rows).abs().max() < 0.03
        (out.float() * grad * rows).sum().backward()
        for half, leaf in zip(halves, leaves):
            assert (half.grad.float() - leaf.grad).abs().max() < 0.05 * leaf.grad.abs().max()
        outs.append(out.float())
    assert (outs[0] - outs[-1]).abs().max() > 0.1 or queries > 1  # the padding mask matters for these rows
    two_tokens = torch.randn(3, 6, 2, 8, generator=gen).bfloat16()
    for args in [(q, k, v, keep), (two_tokens, k.bfloat16(), v.bfloat16(), None)]:  # float32; several, no mask
        assert torch.equal(sdpa_matmul(Heads(), *args)[0], sdpa_attention_forward(Heads(), *args)[0])


def test_policy_decodes_with_the_matmul_attention_in_bfloat16():
    """A bfloat16 policy configured with `sdpa` decodes through `sdpa_matmul`: one decode step after a padded
    prefill gives the logits of transformers' own sdpa (bfloat16 rounding apart)."""
    policy = Policy(PolicyConfig("tiny-random-llama", dtype="bfloat16", lora_dropout=0.0))
    hf = policy.model.get_base_model()
    assert hf.config._attn_implementation == "sdpa_matmul"
    enc = policy.tokenizer([TEXT, "Hi there"], return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    logits = []
    for impl in ("sdpa", "sdpa_matmul"):
        hf.set_attn_implementation(impl)
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, position_ids=minirec.policy.left_padded_positions(mask))
            step = hf(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, :1]], 1),
                      position_ids=mask.sum(1, keepdim=True), past_key_values=out.past_key_values)
        logits.append(step.logits[:, -1].float())
    assert (logits[0] - logits[1]).abs().max() < 0.05 * logits[0].abs().max()


def test_bfloat16_lora_runs_in_bfloat16_with_float32_weights_and_gradients():
    """With bfloat16 base weights the LoRA matmuls take bfloat16 inputs (not float32 copies of them) and the float32
    LoRA weights get float32 gradients, which agree with PEFT's float32 LoRA computation (the decoder's own forward)."""
    _, half = pair("tiny-random-llama", 0.05)
    half.train()
    ids, mask, comp = sequence(half)
    seen = set()
    layer = next(iter(half._lora_layers().values()))
    hook = layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.add((i[0].dtype, o.dtype)))
    decoder = half.model.get_base_model().get_decoder()
    grads = []
    for forward, casting in [(decoder.forward, False), (decoder.forward.__wrapped__, True)]:  # ours, then PEFT's
        decoder.forward = forward
        for module in half._lora_layers().values():
            module.cast_input_dtype_enabled = casting
        logps, emb = half.forward_sequences(ids, mask, comp)
        (-logps.sum() + emb.square().sum()).backward()
        grads.append(flat(p.grad for p in lora(half)))
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in lora(half))
        half.model.zero_grad()
        if not casting:
            assert seen == {(torch.bfloat16, torch.bfloat16)}
            seen.clear()
    hook.remove()
    assert seen == {(torch.float32, torch.float32)}  # PEFT's path casts the input: the hook sees what changed
    assert cosine(*grads) > 0.995 and 0.97 < grads[0].norm() / grads[1].norm() < 1.03  # bfloat16 rounding
