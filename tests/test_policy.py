"""Policy: generation with marker stopping and shared-prefill sampling, sequence joining, chunked log-probs,
embeddings, LoRA state and adapters, double backward. Tiny random models from the preset cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from peft import PeftModel
from transformers import (AutoModelForCausalLM, DynamicCache, GenerationConfig, LogitsProcessorList,
                          StoppingCriteriaList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from minirec.io import DataError
from minirec.models import resolve_pretrained
from minirec.policy import MarkerStop, Policy, PolicyConfig, finish_completion, preallocate, sampling_candidates

MARKER = [44, 11247, 46]  # "<answer>" with the SmolLM2 tokenizer
TEXTS = ["I liked [Abbey Road] and [Kind of Blue].", "Rated [Thriller] 5/5 and [Rumours] 4/5 last month, then more."]


@pytest.fixture(scope="module")
def policy() -> Policy:
    """A shared tiny Qwen2 policy; tests that change its weights build their own."""
    return Policy(PolicyConfig("tiny-random-qwen2"))


def prompts(policy: Policy, texts: list[str] = TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts `[B, P]` and their mask."""
    chats = [[{"role": "user", "content": t}] for t in texts]
    enc = policy.tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                               return_dict=True)
    return enc["input_ids"], enc["attention_mask"]


def randomize_lora(policy: Policy, seed: int = 0) -> None:
    """Seeded LoRA weights with non-zero B (PEFT starts B at zero), so the adapter changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def real_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(ids, mask)]


def sequences(policy: Policy, max_new_tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joined prompt + greedy completion sequences of TEXTS."""
    ids, mask = prompts(policy)
    comp, cmask = policy.generate(ids, mask, do_sample=False, max_new_tokens=max_new_tokens)
    return policy.join(ids, mask, comp, cmask)


# ---- generation ---------------------------------------------------------------------------------------------------


def test_marker_ids_and_errors(policy):
    assert policy.marker_ids == MARKER
    for bad in ["", "<|im_end|>"]:
        with pytest.raises(DataError, match="answer_marker"):
            Policy(PolicyConfig("tiny-random-qwen2", answer_marker=bad))


def tokens(policy: Policy, text: str) -> list[int]:
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_finish_completion_rules(policy):
    tok, eos = policy.tokenizer, {2}
    hi = tokens(policy, "Hi")
    assert finish_completion(tokens(policy, "Hi<answer> then<answer>"), tok, "<answer>", eos) == hi + MARKER  # first
    assert finish_completion(hi + [2, *MARKER], tok, "<answer>", eos) == hi + MARKER  # EOS ends it, marker appended
    partial = tokens(policy, "Hi <answer")
    assert finish_completion(partial, tok, "<answer>", eos) == partial + MARKER
    assert finish_completion([2, 2, 2], tok, "<answer>", eos) == MARKER
    assert finish_completion([*MARKER, 2], tok, "<answer>", eos) == MARKER


@pytest.mark.parametrize("text, before", [
    ("I recommend <answer> Abbey Road</answer>", "I recommend "),  # ' <' token
    ("Abbey Road fits.\n<answer>. Abbey Road", "Abbey Road fits.\n"),  # '>.' token
    ("Because\n <answer> Abbey Road", "Because\n "),
    ("It fits.<answer>", "It fits."),  # '.<' token
])
def test_finish_completion_finds_marker_text_inside_tokens(policy, text, before):
    """The marker tokenizes differently inside text; the completion still stops at it and ends with its own ids,
    keeping the text before it (whitespace included) and nothing after."""
    generated = tokens(policy, text)
    assert MARKER not in [generated[i : i + 3] for i in range(len(generated))]  # matching ids would miss it
    done = finish_completion(generated, policy.tokenizer, "<answer>", {2})
    assert done == tokens(policy, before) + MARKER
    assert policy.tokenizer.decode(done) == before + "<answer>"


def test_finish_completion_keeps_generated_tokens_before_the_marker(policy):
    """Tokens that lie wholly before the marker stay as sampled (here a non-canonical split of " recommend"); only
    the space of the ' <' token is re-encoded."""
    head = tokens(policy, "I") + tokens(policy, " re") + tokens(policy, "commend")
    assert head != tokens(policy, "I recommend")
    done = finish_completion(head + tokens(policy, " <answer> x"), policy.tokenizer, "<answer>", {2})
    assert done == head + tokens(policy, " ") + MARKER


def test_marker_stop_matches_marker_text_of_generated_tokens(policy):
    tok = policy.tokenizer
    stop = MarkerStop(tok, "<answer>", prompt_len=2)

    def done(prompt: str, generated: str) -> bool:
        return stop(torch.tensor([tokens(policy, prompt)[:2] + tokens(policy, generated)]), None).item()

    assert done("Go on", " <answer>") and done("Go on", "I recommend <answer>") and done("Go on", "Fits\n<answer>.")
    assert not done("Go on", "I recommend <answer")
    assert not done("x <", "answer>")  # marker partly in the prompt
    rows = [[9, 9, *tokens(policy, text)] for text in ("I recommend <answer>", "I recommend <answe")]
    assert stop(torch.tensor(rows), None).tolist() == [True, False]


def test_sampled_generate_shapes_grouping_and_marker(policy):
    ids, mask = prompts(policy)
    torch.manual_seed(0)
    comp, cmask = policy.generate(ids, mask, num_samples=3, max_new_tokens=8)
    assert comp.shape[0] == 6 and cmask.shape == comp.shape and comp.shape[1] <= 8 + len(MARKER)
    for row, m in zip(comp, cmask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # right-padded
        assert (row[n:] == policy.tokenizer.pad_token_id).all()
        toks = row[:n].tolist()
        assert toks[-3:] == MARKER and finish_completion(toks, policy.tokenizer, "<answer>", set()) == toks
    # Seeded sampling is reproducible; the three samples of a prompt differ (temperature 1.5 over 49k tokens).
    torch.manual_seed(0)
    again = policy.generate(ids, mask, num_samples=3, max_new_tokens=8)
    assert torch.equal(again[0], comp) and torch.equal(again[1], cmask)
    assert len({tuple(r) for r in real_rows(comp[:3], cmask[:3])}) == 3


def plain_generate(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, num_samples: int, max_new_tokens: int):
    """HF generate with num_return_sequences=G (each prompt expanded G times before its prefill), with the sampling
    settings (no top-k), stop ids and marker stop of `Policy.generate`: the sequences `[B x G, P + T]`."""
    config = GenerationConfig(do_sample=True, num_return_sequences=num_samples, temperature=1.5, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=policy.tokenizer.pad_token_id,
                              eos_token_id=sorted(policy.stop_ids), repetition_penalty=1.0)
    stop = MarkerStop(policy.tokenizer, policy.answer_marker, ids.shape[1])
    return policy.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 stopping_criteria=StoppingCriteriaList([stop]))


@pytest.mark.parametrize("top_k", [0, 200])
@pytest.mark.parametrize("arch, marker", [  # "e": most rows stop early, at different steps
    ("qwen2", "<answer>"), ("qwen2", "e"), ("llama", "<answer>"), ("llama", "e"), ("gemma2", "e"),
])
def test_shared_prefill_sampling_draws_the_plain_path_samples(arch, marker, top_k):
    """One prefill per prompt (its KV cache repeated G times) draws, under a seed, exactly the samples of the plain
    path, which prefills each prompt G times: without top-k HF generate with num_return_sequences=G; with top-k
    (drawn among the candidates, not as HF draws) the same loop over the prompts repeated G times. 3 left-padded
    prompts of different lengths, G=4."""
    policy = Policy(PolicyConfig(f"tiny-random-{arch}", answer_marker=marker,
                    attn_implementation="eager" if arch == "gemma2" else "sdpa"))
    randomize_lora(policy)
    ids, mask = prompts(policy, TEXTS + ["Hi"])
    assert len(set(mask.sum(1).tolist())) == 3
    shapes = []
    hook = policy.model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape)))
    runs = []
    for seed in range(2):
        with torch.no_grad():
            torch.manual_seed(seed)
            shapes.clear()
            plain = plain_generate(policy, ids, mask, 4, 12) if top_k == 0 else policy._sample(
                ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), 1, 1.5, top_k, 1.0, max_new_tokens=12)
            assert shapes[0] == (12, ids.shape[1])  # the plain path prefills B x G rows
            torch.manual_seed(seed)
            shapes.clear()
            shared = policy._sample(ids, mask, 4, temperature=1.5, top_k=top_k, top_p=1.0, max_new_tokens=12)
        assert shapes == [(3, ids.shape[1])] + [(12, 1)] * (shared.shape[1] - ids.shape[1] - 1)  # one prefill a prompt
        assert torch.equal(shared, plain)  # same tokens, same stopping step, stopped rows padded alike
        runs.append(plain)
    hook.remove()
    assert not torch.equal(*runs)
    torch.manual_seed(1)
    comp, cmask = policy.generate(ids, mask, num_samples=4, top_k=top_k, max_new_tokens=12)
    cut = policy.stop_ids | {policy.tokenizer.pad_token_id}
    assert real_rows(comp, cmask) == [finish_completion(r, policy.tokenizer, marker, cut)
                                      for r in plain[:, ids.shape[1] :].tolist()]
    if marker == "e":  # some rows stopped at the marker before others
        assert 0 < int((plain[:, -1] == policy.tokenizer.pad_token_id).sum()) < 12


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.5, 200, 1.0), (1.0, 20, 0.9), (0.7, 1, 1.0), (1.5, 0, 0.8), (1.5, 600, 1.0), (1.0, 0, 1.0),
])
def test_sampling_candidates_give_the_hf_warped_distribution(temperature, top_k, top_p):
    """`sampling_candidates` puts on each token the probability HF's temperature / top-k / top-p warpers give it
    (ties with the k-th logit kept, as HF keeps them); with top-k only the candidates are returned."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 600, generator=gen) * 3
    logits[1] = logits[1].round()  # many ties, at the k-th logit too
    probs, ids = sampling_candidates(logits, temperature, top_k, top_p)
    warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    reference = warpers(None, logits.clone()).softmax(-1)
    full = probs if ids is None else torch.zeros_like(logits).scatter(1, ids, probs)
    if top_p < 1.0:  # which of the tokens tied at the top-p cut stay depends on the sort: compare row 1 as a multiset
        full[1], reference[1] = full[1].sort().values, reference[1].sort().values
    assert torch.allclose(full, reference, rtol=1e-5, atol=1e-7)
    assert (ids is None) == (top_k in (0, 600))
    if ids is not None and top_p == 1.0:
        assert (probs[1] > 0).sum() > top_k  # row 1's ties with its k-th logit are candidates too


def test_preallocated_cache_holds_the_concatenated_states_in_one_buffer():
    """The decode cache after `preallocate` returns at every step what HF's concatenating cache returns (the prefill
    repeated per sample, then each new position), from one buffer per layer that is never re-allocated."""
    torch.manual_seed(0)
    cache, reference = DynamicCache(), DynamicCache()
    for layer in range(2):  # 2 prompts, 3 KV heads, 5 prefilled positions, head dim 4
        states = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
        cache.update(*states, layer)
        reference.update(*states, layer)
    reference.batch_repeat_interleave(2)
    preallocate(cache, 2, new_tokens=3)
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    for _ in range(3):
        for layer in range(2):
            new = torch.randn(4, 3, 1, 4), torch.randn(4, 3, 1, 4)
            got, want = cache.update(*new, layer), reference.update(*new, layer)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert cache.get_seq_length() == reference.get_seq_length() == 8
    assert [layer.keys.data_ptr() for layer in cache.layers] == pointers


def test_greedy_is_deterministic_and_grouped_by_prompt(policy):
    ids, mask = prompts(policy)
    comp, cmask = policy.generate(ids, mask, num_samples=2, do_sample=False, max_new_tokens=8)
    rows = real_rows(comp, cmask)
    assert rows[0] == rows[1] and rows[2] == rows[3] and rows[0] != rows[2]
    # Row b*G+g belongs to prompt b: each prompt alone (no padding) gives the same greedy completion.
    for b, text in enumerate(TEXTS):
        one_ids, one_mask = prompts(policy, [text])
        alone = real_rows(*policy.generate(one_ids, one_mask, do_sample=False, max_new_tokens=8))[0]
        assert alone == rows[2 * b]


def greedy_tokens(policy: Policy) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first prompt of TEXTS and its 24 greedy tokens (no marker among them)."""
    ids, mask = prompts(policy, TEXTS[:1])
    free = policy.generate(ids, mask, do_sample=False, max_new_tokens=24)[0][0, :24].tolist()
    assert "<answer>" not in policy.tokenizer.decode(free)
    return ids, mask, free


def test_generation_stops_at_first_marker(policy):
    """Use tokens the model greedily writes anyway as the marker: generation must stop right after them."""
    ids, mask, free = greedy_tokens(policy)
    tok = policy.tokenizer
    for i in range(2, 20):
        cand = free[i : i + 2]
        text = tok.decode(cand)
        if tokens(policy, text) == cand and tok.decode(free[: i + 2]).find(text) == len(tok.decode(free[:i])):
            break
    else:
        pytest.fail("no greedy token pair usable as a marker")
    stopping = Policy(PolicyConfig("tiny-random-qwen2", answer_marker=text))
    assert stopping.marker_ids == cand
    comp, cmask = stopping.generate(ids, mask, do_sample=False, max_new_tokens=24)
    assert real_rows(comp, cmask)[0] == free[: i + 2]


def test_generation_stops_at_marker_text_that_starts_inside_a_token(policy):
    """A marker that starts inside a generated token (as in ' <answer>'): generation still stops right after it, and
    the completion is the tokens before it, the re-encoded first character of the token it starts in, then the marker
    ids."""
    ids, mask, free = greedy_tokens(policy)
    tok = policy.tokenizer
    for i in range(2, 20):
        head, first, second = tok.decode(free[:i]), tok.decode(free[i : i + 1]), tok.decode(free[i + 1 : i + 2])
        marker = first[1:] + second
        if (len(first) >= 2 and first.isascii() and second.isascii() and tok.decode(tokens(policy, marker)) == marker
                and tok.decode(free[: i + 2]).find(marker) == len(head) + 1
                and not set(tokens(policy, marker)) & set(tok.all_special_ids)):
            break
    else:
        pytest.fail("no greedy token pair usable for a marker starting inside a token")
    stopping = Policy(PolicyConfig("tiny-random-qwen2", answer_marker=marker))
    comp, cmask = stopping.generate(ids, mask, do_sample=False, max_new_tokens=24)
    assert real_rows(comp, cmask)[0] == free[:i] + tokens(policy, first[:1]) + stopping.marker_ids


def test_generate_restores_training_mode(policy):
    ids, mask = prompts(policy, TEXTS[:1])
    policy.train()
    try:
        policy.generate(ids, mask, max_new_tokens=2)
        assert policy.training and policy.model.training
    finally:
        policy.eval()
    policy.generate(ids, mask, max_new_tokens=2)
    assert not policy.training


# ---- join / log-probs / embeddings --------------------------------------------------------------------------------


def test_join_repacks_left_padded(policy):
    pad = policy.tokenizer.pad_token_id
    p_ids = torch.tensor([[pad, pad, 10, 11], [20, 21, 22, 23]])
    p_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    c_ids = torch.tensor([[30, 31, 32], [40, pad, pad]])
    c_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ids, mask, comp = policy.join(p_ids, p_mask, c_ids, c_mask)
    assert ids.tolist() == [[pad, pad, 10, 11, 30, 31, 32], [pad, pad, 20, 21, 22, 23, 40]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    assert comp.tolist() == [[False] * 4 + [True] * 3, [False] * 6 + [True]]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_logprobs_match_full_log_softmax_and_embedding_is_final_norm_state(arch):
    policy = Policy(PolicyConfig(f"tiny-random-{arch}", attn_implementation="eager", logprob_chunk_size=5))
    randomize_lora(policy)
    ids, mask, comp = sequences(policy)
    logps, emb = policy.forward_sequences(ids, mask, comp)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    naive = out.logits.float().log_softmax(-1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    assert logps.dtype == torch.float32 and logps.shape == ids.shape
    assert torch.allclose(logps[:, 1:], naive * comp[:, 1:], atol=1e-5)
    assert (logps[~comp] == 0).all() and (logps[comp] < 0).all()
    assert emb.shape == (2, policy.hidden_size)
    assert torch.allclose(emb, out.hidden_states[-1][:, -1], atol=1e-6)
    # ... and both are the output of the final norm at the last token; `encode` gives the same embeddings.
    normed = []
    hook = policy.model.get_base_model().get_decoder().norm.register_forward_hook(lambda m, i, o: normed.append(o))
    try:
        policy.forward_sequences(ids, mask)
    finally:
        hook.remove()
    assert torch.allclose(normed[0][:, -1], emb)
    assert torch.allclose(policy.encode(ids, mask), emb, atol=1e-5)


@pytest.mark.parametrize("arch, attn", [("qwen2", "sdpa"), ("llama", "eager"), ("gemma2", "eager")])
def test_encode_runs_the_shared_prefix_once(arch, attn):
    """In eval mode without gradient, `encode` runs the first tokens all rows share once (here the chat template's
    system prompt, before the rows differ) and the rest of each row after them: the embeddings of the full forward,
    for rows of different lengths. Rows that share nothing run the full forward."""
    policy = Policy(PolicyConfig(f"tiny-random-{arch}", attn_implementation=attn))
    randomize_lora(policy)
    ids, mask = prompts(policy, TEXTS + ["Hi"])
    lengths = mask.sum(1).tolist()
    with torch.no_grad(), embedding_inputs(policy) as shapes:
        full = policy.forward_sequences(ids, mask)[1]
        shapes.clear()
        shared = policy.encode(ids, mask)
        prefix = shapes[0][1]
        assert shapes == [(1, prefix), (3, max(lengths) - prefix)] and 0 < prefix < min(lengths)
        assert torch.allclose(shared, full, atol=1e-5)
        nothing_shared = mask.clone()
        nothing_shared[0, -lengths[0]] = 0  # row 0 now starts one token later than the others
        shapes.clear()
        assert torch.allclose(policy.encode(ids, nothing_shared), policy.forward_sequences(ids, nothing_shared)[1])
        assert shapes == [ids.shape] * 2
        with pytest.raises(DataError, match="left-padded"):  # as the full forward refuses it
            policy.encode(ids.flip(1), mask.flip(1))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_encode_with_gradient_shares_the_prefix_unless_dropout_or_checkpointing(arch):
    """In training mode with gradient (the items of the rec loss), the shared prefix runs once and the embeddings and
    LoRA gradient equal the full forward's; with LoRA dropout (each row's own dropout mask) or gradient checkpointing
    (transformers drops the cache) in training mode, `encode` runs the full forward."""
    policy = Policy(PolicyConfig(f"tiny-random-{arch}", attn_implementation="eager", lora_dropout=0.0))
    randomize_lora(policy)
    policy.train()
    ids, mask = prompts(policy, TEXTS + ["Hi"])
    params = [p for p in policy.parameters() if p.requires_grad]

    def run(forward):
        emb = forward()
        return emb.detach(), torch.autograd.grad(emb.pow(2).sum() + emb.sum(), params)

    with embedding_inputs(policy) as shapes:
        emb_s, grad_s = run(lambda: policy.encode(ids, mask))
        assert len(shapes) == 2 and shapes[0][0] == 1  # the prefix once, then the rest of every row
        emb_f, grad_f = run(lambda: policy.forward_sequences(ids, mask)[1])
        assert torch.allclose(emb_s, emb_f, atol=1e-5)
        assert all((a - b).abs().max() <= 1e-4 * b.abs().max() for a, b in zip(grad_s, grad_f))
    for config in (dict(lora_dropout=0.1), dict(gradient_checkpointing=True)):
        settings = {"attn_implementation": "eager", "lora_dropout": 0.0} | config
        other = Policy(PolicyConfig(f"tiny-random-{arch}", **settings))
        other.train()
        with embedding_inputs(other) as shapes:
            other.encode(ids, mask).sum().backward()
            assert shapes == [ids.shape], config
        other.eval()
        with embedding_inputs(other) as shapes:
            other.encode(ids, mask)
            assert len(shapes) == 2, config  # eval mode: no dropout, checkpointing off, the prefix is shared


@pytest.mark.parametrize("arch, attn", [("qwen2", "sdpa"), ("llama", "eager"), ("gemma2", "eager")])
def test_reason_and_encode_runs_each_prompt_once(arch, attn):
    """Greedy reasoning then the user embedding (validation, test, scoring) run each prompt once: its cache serves the
    decoding and the embedding pass, which runs only the last prompt token and the completion. Same completions as
    greedy `generate` and the embeddings `encode` gives the joined rows, for prompts of different lengths."""
    policy = Policy(PolicyConfig(f"tiny-random-{arch}", attn_implementation=attn))
    randomize_lora(policy)
    ids, mask = prompts(policy, TEXTS + ["Hi"])
    comp, cmask = policy.generate(ids, mask, do_sample=False, max_new_tokens=6)
    with torch.no_grad():
        expected = policy.encode(*policy.join(ids, mask, comp, cmask)[:2])
    with embedding_inputs(policy) as shapes:
        emb, comp2, cmask2 = policy.reason_and_encode(ids, mask, max_new_tokens=6)
    assert torch.equal(comp2, comp) and torch.equal(cmask2, cmask)
    assert torch.allclose(emb, expected, atol=1e-5)
    assert shapes[0] == (3, ids.shape[1] - 1) and shapes[-1] == (3, 1 + comp.shape[1])  # the prompts, the rest
    assert all(s == (3, 1) for s in shapes[1:-1])  # greedy decoding after the prompts' cache: one token per step


def test_partitioned_weights_run_every_row_in_full():
    """Under ZeRO-3 (partitioned weights carry `ds_id`) every rank must run the same forward passes, so
    `reason_and_encode` runs greedy `generate` on the whole prompts, then `encode` runs the joined rows in full (no
    shared prefix): the same completions and embeddings as the one-prefill path."""
    policy = Policy(PolicyConfig("tiny-random-qwen2"))
    randomize_lora(policy)
    ids, mask = prompts(policy, TEXTS + ["Hi"])
    expected, comp, cmask = policy.reason_and_encode(ids, mask, max_new_tokens=6)
    policy.model.get_base_model().get_input_embeddings().weight.ds_id = 0
    with embedding_inputs(policy) as shapes:
        emb, comp2, cmask2 = policy.reason_and_encode(ids, mask, max_new_tokens=6)
    assert torch.equal(comp2, comp) and torch.equal(cmask2, cmask)
    assert torch.allclose(emb, expected, atol=1e-5)
    joined = policy.join(ids, mask, comp, cmask)[0]
    assert shapes[0] == tuple(ids.shape) and shapes[-1] == tuple(joined.shape)  # whole prompts, whole joined rows


@contextmanager
def embedding_inputs(policy: Policy) -> Iterator[list[tuple[int, ...]]]:
    """The shapes `[R, S]` of the token ids each forward pass of `policy` runs, in order, while the block runs."""
    shapes: list[tuple[int, ...]] = []
    hook = policy.model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        yield shapes
    finally:
        hook.remove()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_forward_equals_the_joined_rows_with_gradient(arch, checkpointing):
    """Each prompt run once for its n completions (different lengths, left-padded prompts) gives the joined rows'
    log-probs, embeddings and LoRA gradient, with and without gradient checkpointing."""
    policy = Policy(PolicyConfig(f"tiny-random-{arch}", attn_implementation="eager", lora_dropout=0.0,
                                 gradient_checkpointing=checkpointing))
    randomize_lora(policy)
    policy.train()
    ids, mask = prompts(policy)
    torch.manual_seed(0)
    comp, cmask = policy.generate(ids, mask, num_samples=3, max_new_tokens=6)
    cmask[1, 2:] = 0  # a shorter completion in the middle of a group
    comp = comp.masked_fill(~cmask.bool(), policy.tokenizer.pad_token_id)
    params = [p for p in policy.parameters() if p.requires_grad]

    def run(forward):
        logps, emb = forward()
        loss = logps.sum() + emb.pow(2).sum()
        return logps.detach(), emb.detach(), torch.autograd.grad(loss, params)

    j_ids, j_mask, j_comp = policy.join(ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), comp, cmask)
    lp_j, emb_j, grad_j = run(lambda: policy.forward_sequences(j_ids, j_mask, j_comp))
    lp_g, emb_g, grad_g = run(lambda: policy.forward_groups(ids, mask, comp, cmask))
    assert lp_g.shape == comp.shape and (lp_g[~cmask.bool()] == 0).all()
    assert torch.allclose(lp_g[cmask.bool()], lp_j[j_comp], atol=1e-5)
    assert torch.allclose(emb_g, emb_j, atol=1e-5)
    assert all((a - b).abs().max() <= 1e-4 * b.abs().max() for a, b in zip(grad_g, grad_j))  # float rounding
    with pytest.raises(DataError, match="left-padded"):
        policy.forward_groups(ids.flip(1), mask.flip(1), comp, cmask)


def test_logprobs_and_embeddings_ignore_left_padding(policy):
    ids, mask, comp = sequences(policy)
    logps, emb = policy.forward_sequences(ids, mask, comp)
    pad = torch.full((2, 5), policy.tokenizer.pad_token_id)
    no = torch.zeros((2, 5), dtype=torch.long)
    logps_p, emb_p = policy.forward_sequences(torch.cat([pad, ids], 1), torch.cat([no, mask], 1),
                                              torch.cat([no.bool(), comp], 1))
    assert torch.allclose(logps_p[:, 5:], logps, atol=1e-5) and (logps_p[:, :5] == 0).all()
    assert torch.allclose(emb_p, emb, atol=1e-5)
    with pytest.raises(DataError, match="left-padded"):
        policy.forward_sequences(torch.cat([ids, pad], 1), torch.cat([mask, no], 1))


def test_logprobs_match_generate_scores(policy):
    """Greedy tokens scored by HF generate (temperature 1, KV cache, padded batch) = forward_sequences log-probs."""
    ids, mask = prompts(policy)
    out = policy.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                output_logits=True, return_dict_in_generate=True,
                                pad_token_id=policy.tokenizer.pad_token_id)
    comp = out.sequences[:, ids.shape[1]:]
    assert comp.shape[1] == 6 and (comp != policy.tokenizer.eos_token_id).all()
    expected = torch.stack(out.logits, 1).float().log_softmax(-1).gather(2, comp[..., None]).squeeze(2)
    j_ids, j_mask, j_comp = policy.join(ids, mask, comp, torch.ones_like(comp))
    logps, _ = policy.forward_sequences(j_ids, j_mask, j_comp)
    assert torch.allclose(logps[j_comp].view(2, -1), expected, atol=1e-4)


# ---- training ------------------------------------------------------------------------------------------------------


def test_only_lora_gets_gradients(policy):
    ids, mask, comp = sequences(policy)
    policy.train()
    try:
        logps, emb = policy.forward_sequences(ids, mask, comp)
        (logps.sum() + emb.square().sum()).backward()
        named = dict(policy.model.named_parameters())
        lora = {n for n in named if "lora_" in n}
        assert lora and set(policy.trainable_state_dict()) == lora
        assert all(named[n].grad is not None for n in lora)
        assert all(named[n].grad is None and not named[n].requires_grad for n in named.keys() - lora)
        assert all(named[n].grad.abs().sum() > 0 for n in lora if "lora_B" in n)
    finally:
        policy.model.zero_grad(set_to_none=True)
        policy.eval()


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        p = Policy(PolicyConfig("tiny-random-llama", lora_dropout=0.0, gradient_checkpointing=ckpt))
        randomize_lora(p)
        ids, mask, comp = sequences(p)
        p.train()
        logps, emb = p.forward_sequences(ids, mask, comp)
        (logps.sum() + emb.sum()).backward()
        assert p.model.get_base_model().is_gradient_checkpointing == ckpt
        grads.append({n: q.grad for n, q in p.model.named_parameters() if q.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])


def test_trainable_state_dict_roundtrip():
    source = Policy(PolicyConfig("tiny-random-qwen2"))
    randomize_lora(source, seed=3)
    ids, mask, comp = sequences(source)
    expected = source.forward_sequences(ids, mask, comp)
    sd = source.trainable_state_dict()
    assert all("lora_" in n for n in sd) and len(sd) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    target = Policy(PolicyConfig("tiny-random-qwen2"))
    target.load_trainable_state_dict(sd)
    got = target.forward_sequences(ids, mask, comp)
    assert torch.allclose(got[0], expected[0]) and torch.allclose(got[1], expected[1])
    with pytest.raises(DataError, match="lora_r"):
        Policy(PolicyConfig("tiny-random-qwen2", lora_r=8)).load_trainable_state_dict(sd)
    with pytest.raises(DataError, match="missing"):
        target.load_trainable_state_dict({k: v for k, v in list(sd.items())[1:]})


def test_save_adapter_opens_with_plain_peft(tmp_path):
    policy = Policy(PolicyConfig("tiny-random-qwen2", lora_r=8))
    randomize_lora(policy, seed=5)
    policy.save_adapter(tmp_path / "adapter")
    policy.save_adapter(tmp_path / "adapter")  # replacing an existing export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    ids, mask, comp = sequences(policy)
    base = AutoModelForCausalLM.from_pretrained(resolve_pretrained("tiny-random-qwen2"))
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(a, b, atol=1e-5)
    reloaded = Policy(PolicyConfig("tiny-random-qwen2", adapter_path=str(tmp_path / "adapter")))  # lora_r from the adapter
    sd, sd2 = policy.trainable_state_dict(), reloaded.trainable_state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert {n for n, p in reloaded.model.named_parameters() if p.requires_grad} == sd.keys()  # trainable
    with pytest.raises(DataError, match="adapter_path"):
        Policy(PolicyConfig("tiny-random-qwen2", adapter_path=str(tmp_path)))


def test_merged_state_dict_gives_the_adapted_model():
    """The base model loading `merged_state_dict()` (every key, strictly) computes what the policy with its adapter
    computes (float32), and the policy's own weights stay unmerged."""
    policy = Policy(PolicyConfig("tiny-random-qwen2", lora_r=8))
    randomize_lora(policy, seed=3)
    merged = policy.merged_state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_pretrained("tiny-random-qwen2"))
    ids, mask, _ = sequences(policy)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        base.load_state_dict(merged, strict=True)
        a = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(a, b, atol=1e-5) and (a - before).abs().max() > 1e-3
    assert torch.equal(policy.merged_state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       merged["model.layers.0.self_attn.q_proj.weight"])  # computing it changed nothing


def test_generation_runs_with_the_adapter_merged_and_restores_the_base_weights():
    """`merged_adapter` computes what the adapter does (float32) with the adapter off, and leaves the base weights
    bit for bit as they were; generation runs in it, so it draws the LoRA path's greedy tokens; with the adapter
    disabled (the zero-shot model) it merges nothing, and a fresh adapter (the identity) is only turned off."""
    policy = Policy(PolicyConfig("tiny-random-qwen2", lora_r=8, lora_dropout=0.0))
    ids, mask = prompts(policy)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hf = policy.model.get_base_model()

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return policy.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    weights, with_fresh_adapter = {k: v.clone() for k, v in hf.state_dict().items()}, logits()
    with policy.merged_adapter():  # a fresh adapter: nothing to merge, the base model computes the same
        assert all(m.disable_adapters for m in policy._lora_layers().values())
        assert torch.equal(logits(), with_fresh_adapter)
    assert not any(m.disable_adapters for m in policy._lora_layers().values())
    assert all(torch.equal(v, weights[k]) for k, v in hf.state_dict().items())
    randomize_lora(policy, seed=4)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    adapted = logits()
    with policy.model.disable_adapter():
        zero_shot = logits()
        with policy.merged_adapter():
            assert torch.equal(logits(), zero_shot)
    with policy.merged_adapter():
        assert all(m.disable_adapters for m in policy._lora_layers().values())
        assert torch.allclose(logits(), adapted, atol=1e-5) and (adapted - zero_shot).abs().max() > 1e-3
    assert all(torch.equal(v, weights[k]) for k, v in hf.state_dict().items())
    assert torch.equal(logits(), adapted)
    config = GenerationConfig(do_sample=False, max_new_tokens=8, pad_token_id=policy.tokenizer.pad_token_id,
                              eos_token_id=sorted(policy.stop_ids), repetition_penalty=1.0)
    with torch.no_grad():
        lora_path = policy.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    comp, cmask = policy.generate(ids, mask, do_sample=False, max_new_tokens=8)
    cut = policy.stop_ids | {policy.tokenizer.pad_token_id}
    assert real_rows(comp, cmask) == [finish_completion(r, policy.tokenizer, "<answer>", cut)
                                      for r in lora_path[:, ids.shape[1]:].tolist()]
    assert all(torch.equal(v, weights[k]) for k, v in hf.state_dict().items())


def test_eager_attention_hessian_vector_product():
    """Grad of grad through encode and the log-probs (LoRA space, padded batch) matches central finite differences of
    the gradient."""
    policy = Policy(PolicyConfig("tiny-random-llama", attn_implementation="eager", lora_dropout=0.0))
    randomize_lora(policy, seed=1)
    ids, mask, comp = sequences(policy, max_new_tokens=3)
    assert not mask.all()  # left padding is part of the check
    params = [p for p in policy.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen) for p in params]
    c = torch.randn(policy.hidden_size, generator=gen)

    def loss() -> torch.Tensor:
        logps, emb = policy.forward_sequences(ids, mask, comp)
        return (emb @ c).square().sum() + logps.sum()

    grads = torch.autograd.grad(loss(), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, direction)), params)
    eps, fd = 1e-4, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * eps * v)
        fd.append(torch.autograd.grad(loss(), params))
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * eps * v)
    numeric = torch.cat([((a - b) / (2 * eps)).flatten() for a, b in zip(*fd)])
    analytic = torch.cat([h.flatten() for h in hvp])
    assert torch.isfinite(analytic).all() and analytic.norm() > 0
    assert (analytic - numeric).norm() / numeric.norm() < 5e-3


# ---- settings ------------------------------------------------------------------------------------------------------


def test_bfloat16_and_bad_settings():
    policy = Policy(PolicyConfig("tiny-random-llama", dtype="bfloat16"))
    assert policy.model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    ids, mask, comp = sequences(policy, max_new_tokens=3)
    logps, emb = policy.forward_sequences(ids, mask, comp)
    assert logps.dtype == emb.dtype == torch.float32 and torch.isfinite(logps).all()
    with pytest.raises(DataError, match="model.dtype"):
        Policy(PolicyConfig("tiny-random-llama", dtype="float8"))
    with pytest.raises(DataError, match="lora_target_modules"):
        Policy(PolicyConfig("tiny-random-llama", lora_target_modules=("no_such_proj",)))
    with pytest.raises(DataError, match="attn_implementation"):
        Policy(PolicyConfig("tiny-random-gemma2", attn_implementation="sdpa"))
