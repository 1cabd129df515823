"""MiniRec selection math (METHOD.md §5): learnability, representativeness and value scores, greedy selection, every
strategy; hand-computed values (the representativeness vectors are in test_representativeness.py)."""

from __future__ import annotations

import decimal
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from minirec.io import DataError
from minirec.selection import (
    STRATEGIES,
    greedy_value_selection,
    k_center_selection,
    learnability,
    representativeness,
    select,
    value_scores,
)

# ---------------------------------------------------------------- learnability


def test_learnability_pool_std() -> None:
    # r = [0, .25, .5, 1]; mean = 1.75/4 = .4375; deviations -.4375 -.1875 .0625 .5625, squares sum .546875,
    # population variance sigma^2 = .546875/4 = .13671875 -> 2 sigma^2 = .2734375 (= 35/128).
    # (r - .5)^2 = .25 .0625 0 .25 -> exponents .25/.2734375 = 32/35 and .0625/.2734375 = 8/35.
    # raw = [e^-32/35, e^-8/35, 1, e^-32/35]; min = e^-32/35, max = 1
    # -> L = [0, (e^-8/35 - e^-32/35)/(1 - e^-32/35), 1, 0]
    lo, mid = math.exp(-32 / 35), math.exp(-8 / 35)
    expected = torch.tensor([0.0, (mid - lo) / (1 - lo), 1.0, 0.0])
    got = learnability(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(got, expected)
    assert 0.6 < got[1] < 0.7  # (0.795659 - 0.400815) / 0.599185 = 0.65897


def test_learnability_fixed_sigma() -> None:
    # sigma = .2 -> 2 sigma^2 = .08; r = [.1, .5, .9, .3] -> (r - .5)^2 = .16 0 .16 .04 -> raw e^-2, 1, e^-2, e^-.5
    # min-max -> [0, 1, 0, (e^-.5 - e^-2)/(1 - e^-2)] = [0, 1, 0, 0.54455]
    expected = torch.tensor([0.0, 1.0, 0.0, (math.exp(-0.5) - math.exp(-2)) / (1 - math.exp(-2))])
    torch.testing.assert_close(learnability(torch.tensor([0.1, 0.5, 0.9, 0.3]), sigma=0.2), expected)
    # mu moves the peak: mu = .9 -> (r - .9)^2 = .64 .16 0 .36 -> exponents 8, 2, 0, 4.5
    raw = torch.tensor([math.exp(-8), math.exp(-2), 1.0, math.exp(-4.5)])
    torch.testing.assert_close(
        learnability(torch.tensor([0.1, 0.5, 0.9, 0.3]), mu=0.9, sigma=0.2), (raw - raw.min()) / (1 - raw.min())
    )


def test_learnability_degenerate_and_errors() -> None:
    # all rewards equal -> pool std 0 -> every sample alike -> all ones (published-code convention)
    torch.testing.assert_close(learnability(torch.full((5,), 0.3)), torch.ones(5))
    torch.testing.assert_close(learnability(torch.tensor([0.7])), torch.ones(1))
    # symmetric around mu with a fixed sigma -> constant raw scores -> ones
    torch.testing.assert_close(learnability(torch.tensor([0.25, 0.75]), sigma=0.1), torch.ones(2))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DataError, match="sigma"):
            learnability(torch.tensor([0.1, 0.2]), sigma=bad)
    with pytest.raises(DataError, match="NaN"):
        learnability(torch.tensor([0.1, float("nan")]))
    with pytest.raises(DataError, match="1-D"):
        learnability(torch.tensor([]))


def _decimal_learnability(r: torch.Tensor, mu: float = 0.5, sigma: float | None = None) -> list[float]:
    """Reference L in 60-digit decimal arithmetic (no underflow): min-max of exp(-(r - mu)^2 / (2 sigma^2))."""
    with decimal.localcontext(decimal.Context(prec=60, Emin=-(10**9))):
        rs = [decimal.Decimal(float(x)) for x in r]
        s = statistics.pstdev(rs) if sigma is None else decimal.Decimal(sigma)
        raw = [(-((x - decimal.Decimal(mu)) ** 2) / (2 * s * s)).exp() for x in rs]
        lo, hi = min(raw), max(raw)
        return [float((v - lo) / (hi - lo)) for v in raw]


@pytest.mark.parametrize(
    "r,sigma",
    [
        (torch.linspace(0.005, 0.015, 7), 0.02),  # exponents near -300: every exp is 0 in float32
        (torch.linspace(0.005, 0.015, 7), 0.01),  # near -1200: 0 in float64 too, yet exp(z - z_max) spans 1..e^-49
        (0.01 + 0.004 * torch.rand(50, generator=torch.Generator().manual_seed(0)), None),  # pool std ~1e-3
        (torch.rand(50, generator=torch.Generator().manual_seed(1)), None),  # an ordinary pool
    ],
)
def test_learnability_does_not_underflow(r: torch.Tensor, sigma: float | None) -> None:
    got = learnability(r, sigma=sigma)
    assert got.dtype == torch.float32 and not (got == 1).all()
    torch.testing.assert_close(got, torch.tensor(_decimal_learnability(r, sigma=sigma)), rtol=1e-5, atol=1e-7)
    closeness = -(r.double() - 0.5).abs()  # higher L for r̄ nearer mu (non-strict: tiny L round to 0)
    assert (got[closeness.argsort()].diff() >= 0).all() and int(got.argmax()) == int(closeness.argmax())
    if sigma is None and r.std() > 0.1:  # where nothing underflows: the naive float32 formula's values
        naive = torch.exp(-((r - 0.5) ** 2) / (2 * r.std(correction=0) ** 2))
        torch.testing.assert_close(got, (naive - naive.min()) / (naive.max() - naive.min()))


def test_learnability_tiny_exponent_range() -> None:
    # exponents 0 and about -7e-21: exp rounds both to 1.0, yet the exact min-max is [1, 0]
    got = learnability(torch.tensor([0.5, 0.5 + 1e-7]), sigma=1e3)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------- representativeness, value


def test_representativeness_known_mean() -> None:
    # u = [4,0], [0,4], [-1,-1], [1,1] -> mean [1, 1]; cos to it: 1/√2, 1/√2, -1, 1
    # (cos + 1)/2 = .85355, .85355, 0, 1 -> min-max over [0, 1] leaves them unchanged
    u = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-1.0, -1.0], [1.0, 1.0]])
    a = (1 + 1 / math.sqrt(2)) / 2
    torch.testing.assert_close(representativeness(u), torch.tensor([a, a, 0.0, 1.0]))
    # u = [3,0], [0,3], [1,1], [0,0] -> mean [1,1]; cos 1/√2, 1/√2, 1, 0 (zero vector) -> (c+1)/2 .8536 .8536 1 .5
    # min-max: (.8536 - .5)/.5 = 1/√2
    u = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(representativeness(u), torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0, 0.0]))
    # a common scale of all u does not matter
    torch.testing.assert_close(representativeness(7.5 * u), representativeness(u))
    with pytest.raises(DataError, match="NaN"):
        representativeness(torch.tensor([[1.0, float("nan")]]))


def test_value_scores() -> None:
    # q = 2 * [0, .5, 1] + [1, .5, 0] = [1, 1.5, 2]
    torch.testing.assert_close(
        value_scores(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0]), alpha=2.0),
        torch.tensor([1.0, 1.5, 2.0]),
    )
    with pytest.raises(DataError, match="alpha"):
        value_scores(torch.zeros(3), torch.zeros(3), alpha=-1.0)
    with pytest.raises(DataError, match="3 entries but the pool has 2"):
        value_scores(torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------- greedy selection


def _unit(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


# points at 0°, 10°, 90°, 180°, 40° on the circle; dist = 1 - cos(angle between)
ANGLES = [0.0, 10.0, 90.0, 180.0, 40.0]
Q = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.8])


def test_greedy_value_selection_hand_example() -> None:
    # step 0: argmax q -> 0.
    # min-dist to {0}: 1: 1-cos10 = .015192, 2: 1, 3: 2, 4: 1-cos40 = .233956; max 2 -> v = d/2
    #   V = v*q: 1: .007596*.9 = .006837, 2: .5*.5 = .25, 3: 1*.2 = .2, 4: .116978*.8 = .093582 -> pick 2
    #   (point 3 is twice as far but its q is low)
    # min-dist to {0,2}: 1: min(.015192, 1-cos80 = .826352) = .015192, 3: min(2, 1) = 1, 4: min(.233956, .357212)
    #   max 1 -> V: 1: .013673, 3: .2, 4: .187165 -> pick 3
    # min-dist to {0,2,3}: 1: .015192, 4: .233956 (1-cos140 = 1.766 is larger); max .233956
    #   V: 1: .015192/.233956*.9 = .058442, 4: 1*.8 -> pick 4, then 1
    emb = _unit(ANGLES)
    assert greedy_value_selection(Q, emb, 5).tolist() == [0, 2, 3, 4, 1]
    assert greedy_value_selection(Q, emb, 2).tolist() == [0, 2]
    # scaling an embedding row does not change cosine distances
    scaled = emb * torch.tensor([[3.0], [1.0], [0.5], [2.0], [9.0]])
    assert greedy_value_selection(Q, scaled, 5).tolist() == [0, 2, 3, 4, 1]


def test_k_center_hand_example() -> None:
    # first=0: farthest from 0° is 180° (d=2) -> 3; then min-dists 1: .015192, 2: min(1, 1) = 1, 4: min(.233956, 1.766)
    #   -> 2; then 1: .015192, 4: .233956 -> 4; then 1.
    emb = _unit(ANGLES)
    assert k_center_selection(emb, 5, first=0).tolist() == [0, 3, 2, 4, 1]
    # default start: mean of the unit vectors = (1.750852, 1.816436)/5 -> angle 46.05°, nearest point is 40° -> 4
    # from 40°: d0 .233956, d1 1-cos30 = .133975, d2 1-cos50 = .357212, d3 1-cos140 = 1.766044 -> 3
    # then min with 180°: d0 .233956, d1 .133975, d2 min(.357212, 1) -> 2; then d0 .233956 > d1 .133975 -> 0, 1
    assert k_center_selection(emb, 5).tolist() == [4, 3, 2, 0, 1]
    with pytest.raises(DataError, match="start index"):
        k_center_selection(emb, 2, first=5)


def test_greedy_degenerate_identical_embeddings_and_ties() -> None:
    # every remaining sample duplicates the first pick: max min-dist is 0 -> v = 1 and q alone decides;
    # q ties (.5 at 1 and 3) go to the lowest index
    emb = torch.ones(4, 3)
    assert greedy_value_selection(torch.tensor([0.1, 0.5, 0.3, 0.5]), emb, 4).tolist() == [1, 3, 2, 0]
    # two identical copies of each of two directions: after one of each is picked, the copies follow by q
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert greedy_value_selection(torch.tensor([0.2, 0.9, 0.1, 0.4]), emb, 4).tolist() == [1, 3, 0, 2]
    # all-equal q and embeddings: pool order
    assert greedy_value_selection(torch.ones(3), torch.ones(3, 2), 3).tolist() == [0, 1, 2]


def test_greedy_prefix_determinism_and_float16() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 8, generator=g)
    q = torch.rand(300, generator=g)
    k10 = greedy_value_selection(q, emb, 10)
    assert greedy_value_selection(q, emb, 5).tolist() == k10[:5].tolist()
    assert torch.equal(greedy_value_selection(q, emb, 10), k10)
    assert len(set(k10.tolist())) == 10 and k10.dtype == torch.long
    # brute-force recomputation of step 2 of the definition from scratch
    e = F.normalize(emb, dim=1)
    dist = (1 - e @ e[k10[:2]].T).min(dim=1).values
    dist[k10[:2]] = 0
    v = (dist / dist.max() * q)
    v[k10[:2]] = -1
    assert int(v.argmax()) == int(k10[2])
    # well-separated data: 40 random directions in 64-D (pairwise cosine distances ~1 ± .15) -> same picks in fp16
    emb = torch.randn(40, 64, generator=g)
    q = torch.rand(40, generator=g)
    assert torch.equal(greedy_value_selection(q, emb, 12, dtype=torch.float16), greedy_value_selection(q, emb, 12))


def test_greedy_errors() -> None:
    emb = _unit(ANGLES)
    with pytest.raises(DataError, match="k must be an integer in 1..5"):
        greedy_value_selection(Q, emb, 6)
    with pytest.raises(DataError, match="k must be"):
        greedy_value_selection(Q, emb, 0)
    with pytest.raises(DataError, match=">= 0"):
        greedy_value_selection(-Q, emb, 2)
    with pytest.raises(DataError, match="4 rows but the pool has 5"):
        greedy_value_selection(Q, emb[:4], 2)
    with pytest.raises(DataError, match="floating"):
        greedy_value_selection(Q, emb, 2, dtype=torch.int32)


# ---------------------------------------------------------------- strategies


def test_every_strategy() -> None:
    n = 5
    r_bar = torch.tensor([0.1, 0.4, 0.0, 0.9, 0.5])
    L = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    R = torch.tensor([0.3, 0.2, 1.0, 0.0, 0.3])
    emb = _unit(ANGLES)
    inputs = dict(mean_rewards=r_bar, L=L, R=R, emb=emb)
    picks = {s: select(s, 3, **inputs).tolist() for s in STRATEGIES}
    assert picks["full"] == [0, 1, 2, 3, 4]  # k ignored: the whole pool in pool order
    assert select("full", None, mean_rewards=r_bar).tolist() == [0, 1, 2, 3, 4]
    assert picks["learnability"] == [1, 3, 0]  # top-3 of L; ties .9 (1, 3) and .5 (0, 2) keep pool order
    assert picks["representativeness"] == [2, 0, 4]  # 1.0, then the tie .3 (0 before 4)
    assert picks["diversity"] == k_center_selection(emb, 3).tolist() == [4, 3, 2]
    # q = L + R = [.8, 1.1, 1.5, .9, .4]; start 2 (90°); then V with dists to 90°: 0: 1*.8, 1: .826352*1.1 = .908987,
    # 3: 1*.9, 4: .357212*.4 -> max is 1: v = dist -> pick 1 (.909 > .9 > .8)
    assert picks["minirec"] == picks["minirec_no_curriculum"] == [2, 1, 3]
    assert select("minirec", 3, alpha=0.0, **inputs).tolist() == greedy_value_selection(R, emb, 3).tolist()
    random_3 = picks["random"]
    assert len(set(random_3)) == 3 and all(0 <= i < n for i in random_3)
    assert select("random", 3, seed=0, **inputs).tolist() == random_3
    assert select("random", 5, seed=0, **inputs).tolist()[:3] == random_3  # seeded permutation prefix
    big = torch.zeros(100)
    assert select("random", 10, mean_rewards=big, seed=1).tolist() != select("random", 10, mean_rewards=big).tolist()


def test_select_errors() -> None:
    r_bar = torch.zeros(5)
    emb = _unit(ANGLES)
    with pytest.raises(DataError, match="unknown selection strategy 'best'"):
        select("best", 2, mean_rewards=r_bar)
    for k in (6, 0, -1, None, 2.5):
        with pytest.raises(DataError, match="k must be"):
            select("random", k, mean_rewards=r_bar)
    with pytest.raises(DataError, match="needs L"):
        select("learnability", 2, mean_rewards=r_bar)
    with pytest.raises(DataError, match="needs R"):
        select("representativeness", 2, mean_rewards=r_bar, L=r_bar)
    with pytest.raises(DataError, match="needs emb"):
        select("diversity", 2, mean_rewards=r_bar)
    with pytest.raises(DataError, match="needs R, emb"):
        select("minirec", 2, mean_rewards=r_bar, L=r_bar)
    with pytest.raises(DataError, match="4 entries but the pool has 5"):
        select("learnability", 2, mean_rewards=r_bar, L=torch.zeros(4))
    with pytest.raises(DataError, match="3 rows but the pool has 5"):
        select("minirec_no_curriculum", 2, mean_rewards=r_bar, L=r_bar, R=r_bar, emb=emb[:3])
