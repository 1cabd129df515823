"""The selection core (`minirec.subsets`): the selection file's round trip and checks, and `select_subsets` on a score
table (prefix property, L / R / q against the selection functions, the records it writes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minirec.io import DataError
from minirec.selection import learnability, representativeness, value_scores
from minirec.subsets import ScoreTable, Selection, SelectionConfig, select_subsets


def table(n: int = 20) -> ScoreTable:
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(n, 3, generator=g)
    return ScoreTable(sample_id=torch.arange(100, 100 + n), rewards=rewards, mean_reward=rewards.mean(1),
                      user_emb=torch.randn(n, 5, generator=g), rep_vec=torch.randn(n, 7, generator=g))


def test_select_subsets_prefixes_scores_and_records(tmp_path: Path) -> None:
    t = table()
    result = select_subsets(t, SelectionConfig(ks=(6, 12), num_stages=3), "fp", proxy_checkpoint="proxy/adapter")
    L = learnability(t.mean_reward)
    torch.testing.assert_close(result.L, L)
    torch.testing.assert_close(result.q, value_scores(L, representativeness(t.rep_vec)))
    small, large = result.selections[6], result.selections[12]
    assert large.selection_order[:6] == small.selection_order and len(set(large.ids)) == 12
    assert sorted(large.ids) == sorted(t.sample_id[result.order].tolist())
    assert large.stages == sorted(large.stages) and set(large.stages) == {0, 1, 2}
    assert (large.fingerprint, large.pool_size, large.proxy_checkpoint, large.k) == ("fp", 20, "proxy/adapter", 12)
    t.save(tmp_path / "table.pt")
    again = select_subsets(ScoreTable.load(tmp_path / "table.pt"), SelectionConfig(ks=(6, 12), num_stages=3), "fp",
                           proxy_checkpoint="proxy/adapter")
    assert again.selections == result.selections


def test_selection_file_round_trip_and_checks(tmp_path: Path) -> None:
    sel = select_subsets(table(), SelectionConfig(ks=(8,), num_stages=2), "fp").selections[8]
    sel.save(tmp_path / "sel.json")
    assert Selection.load(tmp_path / "sel.json", fingerprint="fp") == sel
    with pytest.raises(DataError, match="made for dataset fingerprint fp, but data.processing has other"):
        Selection.load(tmp_path / "sel.json", fingerprint="other")
    (tmp_path / "bad.json").write_text('{"ids": [1, 2], "stages": [0], "fingerprint": "fp"}')
    with pytest.raises(DataError, match="'ids' has 2 entries but 'stages' has 1"):
        Selection.load(tmp_path / "bad.json")
    (tmp_path / "missing.json").write_text('{"ids": [1], "stages": [0]}')
    with pytest.raises(DataError, match="missing field 'fingerprint'"):
        Selection.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no score table"):
        ScoreTable.load(tmp_path / "none.pt")
