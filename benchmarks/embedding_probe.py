"""What the untrained model's embeddings know about the next item, before any training: on the test samples of a data
config, with 95 % bootstrap intervals, next to popularity and random ranking.

    python benchmarks/embedding_probe.py --data configs/data/amazon-beauty.yaml --data.init_args.max_val_samples 64 \
        --policy configs/model/smollm2-135m/policy.yaml --eval_max_new_tokens 8 \
        --out benchmarks/results/embedding_probe/amazon-beauty

Rows of the table (`marker` = the hidden state at the sequence's last token, the answer marker; `mean` = the mean
over the sequence; `L<i>` = after decoder layer i, the last one after the final norm):
- `user: <embedding>`: the user sequence after greedy reasoning against the item prompts, both embedded alike;
  `user: marker L<last>` is the method's embedding, the zero-shot row of `minirec test`. With `common direction`
  every user is replaced by the mean user embedding of the validation samples (one ranking for all); `centred`
  subtracts that mean from each user. `user: marker L<last> vs items: mean L<last>` ranks mean-pooled item prompts
  with the method's user embedding (`both centred`: each side minus its mean, users by the validation users').
- `items: <embedding>[, centred]`: content kNN without generation, the sum of a sample's normalised history-item
  embeddings ranks the catalogue; `centred` subtracts the catalogue's mean embedding first.
- `user: marker L<last>, linear map` (with `--linear_map`): the method's zero-shot user embedding through an affine
  map fitted on the training split's users (`max_predict_samples` of them) against the fixed base-model items, the
  best of it on the validation users kept: what learning the user side alone can add to zero-shot on this split.
  `--linear_map_batch_size` fits it on mini-batches, `--linear_map_heldout` keeps a share of the training samples
  out of the fit; the report lists the map's NDCG@10 on validation, those held-out samples and test as it trains.
Every row is also compared with the method's row, per sample on the same resamples (`user: marker L<last>-<row>`; an
interval that excludes 0 separates the two). The mean item-item cosine of each item embedding (1 = every item alike)
is listed under the table.

Writes embedding_probe.md (table, command, date, machine) and metrics.json into `out`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt

from bench_common import data_parser, markdown_table, print_summary, write_comparison
from datamodules import RecDataModule
from lightning_modules.policy_module import PolicyModule
from minirec.evaluation import (
    bootstrap_intervals,
    candidate_counts,
    metric_names,
    paired_differences,
    per_sample_metrics,
    popularity_ranks,
    random_expectation,
)
from minirec.io import ConfigError
from minirec.policy import PolicyConfig, eval_mode, left_padded_positions
from minirec.recpo import RewardConfig, score_rollouts
from minirec.rewards import mask_history, score_items

KS = (10, 50)


def ranks_of(user: torch.Tensor, catalog: torch.Tensor, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target ranks `[S]` of users `[S, H]` against the catalogue `[N+1, H]`, history masked, as `minirec test` ranks."""
    return score_rollouts(user, catalog, target, history, RewardConfig())[1]


@torch.no_grad()
def hidden_states(
    module: PolicyModule, ids: torch.Tensor, mask: torch.Tensor, layers: list[int]
) -> dict[str, torch.Tensor]:
    """The base model's embeddings `[R, H]` of left-padded sequences `[R, S]` at each of `layers` (hidden-state indices:
    0 = the token embeddings, -1 = after the final norm): the last token's state (`marker`, the method's embedding at
    the last layer) and the mean over the sequence (`mean`)."""
    decoder = module.policy.model.get_base_model().get_decoder()
    with eval_mode(module.policy), module.policy.model.disable_adapter():
        states = decoder(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                         output_hidden_states=True).hidden_states
    weight = mask[..., None].float()
    out = {}
    for layer in layers:
        h = states[layer].float()
        out[f"marker L{layer % len(states)}"] = h[:, -1]
        out[f"mean L{layer % len(states)}"] = (h * weight).sum(1) / weight.sum(1)
    return out


def stack(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batches of `hidden_states` -> one tensor per embedding."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def item_states(module: PolicyModule, dm: RecDataModule, layers: list[int]) -> dict[str, torch.Tensor]:
    """`hidden_states` of every item prompt: `[N+1, H]` per embedding (row 0, padding, zeros)."""
    bs = dm.hparams.item_batch_size
    parts = [hidden_states(module, *dm.item_prompt_batch(range(i, min(dm.num_items + 1, i + bs))), layers)
             for i in range(1, dm.num_items + 1, bs)]
    return {k: F.pad(v, (0, 0, 1, 0)) for k, v in stack(parts).items()}


def user_states(module: PolicyModule, loader, layers: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                          torch.Tensor]:
    """Zero-shot users of every sample of `loader`: `hidden_states` of the user sequence after greedy reasoning
    (`[S, H]` per embedding; `marker` at the last layer is `minirec test`'s zero-shot user embedding), histories
    `[S, L]` and targets `[S]`."""
    parts, history, target = [], [], []
    for batch in loader:
        with module.policy.model.disable_adapter():
            _, seq, mask = module.user_embeddings(batch)
        parts.append(hidden_states(module, seq, mask, layers))
        history.append(batch["history"])
        target.append(batch["target"])
    width = max(h.shape[1] for h in history)
    return stack(parts), torch.cat([F.pad(h, (0, width - h.shape[1])) for h in history]), torch.cat(target)


def fit_linear_map(train: tuple[torch.Tensor, ...], evals: dict[str, tuple[torch.Tensor, ...]], items: torch.Tensor,
                   steps: int = 300, batch_size: int | None = None, lr: float = 1e-3,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """An affine map u = h W + b of user embeddings, from the identity, fitted by Adam on the rec loss over the whole
    catalogue (softmax of cos / τ, history masked) of the training users, `steps` steps on batches of `batch_size`
    users (None: all of them; otherwise seeded shuffles, a new one when fewer than a batch are left); `train` and each
    of `evals` (name -> set) are (embeddings `[S, H]`, histories `[S, L]`, targets `[S]`), `items` `[N+1, H]`.
    Returns W `[H, H]` and b `[H]` after the step with the best NDCG@10 on the first of `evals`, and the curve: per
    step (entry 0: the identity, i.e. zero-shot) the sample visits so far and the NDCG@10 on each of `evals`."""
    users, history, target = train
    w = torch.eye(users.shape[1], requires_grad=True)
    b = torch.zeros(users.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    picks = next(iter(evals))

    def point(visits: int) -> dict[str, float]:
        with torch.no_grad():
            return {"visits": visits, **{name: float(per_sample_metrics(ranks_of(u @ w + b, items, h, t), (10,))[:, 0]
                                                     .mean()) for name, (u, h, t) in evals.items()}}

    torch.manual_seed(seed)
    order, start = torch.randperm(len(target)), 0
    curve = [point(0)]
    best, best_ndcg = (w.detach().clone(), b.detach().clone()), curve[0][picks]
    for _ in range(steps):
        if batch_size is None:
            rows = torch.arange(len(target))
        else:
            if start + batch_size > len(target):
                order, start = torch.randperm(len(target)), 0
            rows, start = order[start : start + batch_size], start + batch_size
        scores = mask_history(score_items(users[rows] @ w + b, items, RewardConfig().tau), history[rows], target[rows])
        loss = F.cross_entropy(scores, target[rows].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(point(curve[-1]["visits"] + len(rows)))
        if curve[-1][picks] > best_ndcg:
            best, best_ndcg = (w.detach().clone(), b.detach().clone()), curve[-1][picks]
    return *best, curve


def curve_table(curve: list[dict[str, float]]) -> str:
    """Markdown table of a `fit_linear_map` curve at 0 and at doubling sample visits (and the last step)."""
    shown, next_visits = [], 0
    for i, c in enumerate(curve):
        if c["visits"] >= next_visits or i == len(curve) - 1:
            shown.append(c)
            next_visits = max(2 * c["visits"], 1)
    return markdown_table(shown, {"visits": "sample visits", **{k: k for k in curve[0] if k != "visits"}})


def run(dm: RecDataModule, policy: PolicyConfig, eval_max_new_tokens: int, out: Path, command: str,
        linear_map: bool = False, map_steps: int = 300, map_batch_size: int | None = None,
        map_heldout: float = 0.0) -> dict:
    """Embed, rank and write the report; returns {row: {metric: mean}}."""
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup()
    module = PolicyModule(policy, RewardConfig(), eval_max_new_tokens)
    module.policy.model.eval()
    layers = [-1, module.policy.model.config.num_hidden_layers // 2]
    items = item_states(module, dm, layers)
    method = next(iter(items))  # the marker at the last layer: the method's embedding
    val_states, val_history, val_target = user_states(module, dm.val_dataloader(), layers)
    val_users = val_states[method]
    users, history, target = user_states(module, dm.test_dataloader(), layers)
    common = val_users.mean(0)
    ranks = {f"user: {name}": ranks_of(users[name], items[name], history, target) for name in items}
    ranks[f"user: {method}, common direction"] = ranks_of(common.expand_as(users[method]), items[method], history,
                                                          target)
    ranks[f"user: {method}, centred"] = ranks_of(users[method] - common, items[method], history, target)
    pooled = method.replace("marker", "mean")  # the item prompts' mean state (All_Beauty's best content-kNN embedding)
    ranks[f"user: {method} vs items: {pooled}"] = ranks_of(users[method], items[pooled], history, target)
    ranks[f"user: {method} vs items: {pooled}, both centred"] = ranks_of(
        users[method] - common, items[pooled] - items[pooled][1:].mean(0), history, target)
    notes = []
    if linear_map:
        train_states, train_history, train_target = user_states(module, dm.predict_dataloader(), layers)
        train = (train_states[method], train_history, train_target)
        rows = torch.randperm(len(train_target), generator=torch.Generator().manual_seed(0))
        held = int(len(rows) * map_heldout)  # training samples the map does not fit: drawn like the ones it does
        evals = {"validation": (val_users, val_history, val_target),
                 **({"held-out training samples": tuple(x[rows[:held]] for x in train)} if held else {}),
                 "test": (users[method], history, target)}
        w, b, curve = fit_linear_map(tuple(x[rows[held:]] for x in train) if held else train, evals, items[method],
                                     map_steps, map_batch_size)
        ranks[f"user: {method}, linear map"] = ranks_of(users[method] @ w + b, items[method], history, target)
        best = max(range(len(curve)), key=lambda i: curve[i]["validation"])
        notes += [f"Linear map: fitted on {len(train_target) - held} training samples ({held} held out), "
                  f"{map_steps} Adam steps of {map_batch_size or 'all'} samples; kept after step {best} "
                  f"(the best validation NDCG@10, {curve[best]['validation']:.4f}; zero-shot "
                  f"{curve[0]['validation']:.4f}). NDCG@10 of the map as it trains (test: for reading only):", "",
                  curve_table(curve), ""]
    anisotropy = {}
    for name, emb in items.items():
        for centred in (False, True):
            e = emb - emb[1:].mean(0) if centred else emb
            unit = F.normalize(e, dim=-1)
            unit[0] = 0  # padding in the histories adds nothing
            row = f"items: {name}{', centred' if centred else ''}"
            ranks[row] = ranks_of(unit[history.long()].sum(1), e, history, target)
            anisotropy[row] = float((unit[1:] @ unit[1:].T).mean())
    ranks["popularity"] = popularity_ranks(dm.item_popularity().float(), history, target)
    values = {k: per_sample_metrics(v, KS) for k, v in ranks.items()}
    values["random"] = random_expectation(candidate_counts(history, target, dm.num_items), KS)
    intervals = bootstrap_intervals({**values, **paired_differences(values, of=f"user: {method}")}, seed=0)
    names = metric_names(KS)
    intro = (f"Data: {dm.processing.dataset}, {dm.num_items} items; model {policy.pretrained} without training; the "
             f"common user direction is the mean of {len(val_users)} validation users' embeddings.")
    notes += ["Mean item-item cosine of each item embedding:", "",
             *[f"- {row}: {cos:.3f}" for row, cos in anisotropy.items()], ""]
    return write_comparison(out, "embedding_probe", "What the untrained model's embeddings rank", command, start,
                            intro, intervals, names, len(target), notes, item_item_cosine=anisotropy)


def main(argv: list[str] | None = None) -> int:
    parser = data_parser("embedding_probe", __doc__)
    parser.add_class_arguments(PolicyConfig, "policy")
    parser.add_argument("--eval_max_new_tokens", type=int, default=8, help="greedy reasoning tokens per user")
    parser.add_argument("--linear_map", type=bool, default=False,
                        help="also fit an affine map of the zero-shot user embedding on the training split's users")
    parser.add_argument("--linear_map_steps", type=PositiveInt, default=300, help="Adam steps of the linear map")
    parser.add_argument("--linear_map_batch_size", type=PositiveInt | None, default=None,
                        help="training samples per step of the linear map (null: all of them)")
    parser.add_argument("--linear_map_heldout", type=float, default=0.0,
                        help="share of the training samples held out of the map's fit and evaluated like validation")
    parser.add_argument("--out", default="benchmarks/results/embedding_probe", help="results folder")
    argv = sys.argv[1:] if argv is None else argv
    cfg = parser.instantiate(parser.parse_args(argv))
    if not 0.0 <= cfg.linear_map_heldout < 1.0:
        raise ConfigError(f"linear_map_heldout={cfg.linear_map_heldout}: must be at least 0 and below 1")
    summary = run(cfg.data, cfg.policy, cfg.eval_max_new_tokens, Path(cfg.out),
                  shlex.join(["python", "benchmarks/embedding_probe.py", *argv]), cfg.linear_map, cfg.linear_map_steps,
                  cfg.linear_map_batch_size, cfg.linear_map_heldout)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from minirec.io import run_command  # a user error: one `error: ...` line, exit status 2 (--debug: traceback)

    sys.exit(run_command(main))
