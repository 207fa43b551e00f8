"""Wave discovery bookkeeping in the shared directory: positions, and who pulls from whom
(chain, tree, unicast). No processes; tests/test_wave.py runs real waves."""

from __future__ import annotations

from pathlib import Path

from netloader.discovery.wave import Wave


def test_positions_are_unique_and_ordered(tmp_path: Path) -> None:
    wave = Wave(tmp_path)
    assert [wave.join(f"10.0.0.{i}:7000") for i in range(4)] == [0, 1, 2, 3]
    assert wave.member(2) == "10.0.0.2:7000"
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [
        f"0000{i}.txt" for i in range(4)
    ]  # no temporary files left behind


def test_chain_tree_and_unicast_sources(tmp_path: Path) -> None:
    (tmp_path / "seed-0.txt").write_text("10.0.0.100:7000\n")
    (tmp_path / "seed-b-0.txt").write_text("10.0.0.101:7000\n")
    (tmp_path / "seed-10.txt").write_text("10.0.0.110:7000\n")  # rank 10, not rank 0
    seeds = ["10.0.0.100:7000", "10.0.0.101:7000"]
    chain = Wave(tmp_path)
    for i in range(7):
        chain.join(f"10.0.0.{i}:7000")
    assert chain.sources(0) == seeds
    assert chain.sources(3) == ["10.0.0.2:7000", "10.0.0.1:7000", "10.0.0.0:7000", *seeds]
    tree = Wave(tmp_path, fanout=2)
    assert [tree.parent(p) for p in range(7)] == [None, None, 0, 0, 1, 1, 2]
    assert tree.sources(6) == ["10.0.0.2:7000", "10.0.0.0:7000", *seeds]
    assert Wave(tmp_path, fanout=None).sources(5) == seeds
    assert Wave(tmp_path, rank=10).seeds() == ["10.0.0.110:7000"]


def test_draft_models_form_their_own_wave(tmp_path: Path) -> None:
    (tmp_path / "seed-0.txt").write_text("10.0.0.100:7000\n")
    (tmp_path / "seed-0.draft.txt").write_text("10.0.0.100:17000\n")
    target, draft = Wave(tmp_path), Wave(tmp_path, kind=".draft")
    assert target.seeds() == ["10.0.0.100:7000"] and draft.seeds() == ["10.0.0.100:17000"]
    assert draft.join("10.0.0.1:17000") == 0 and target.join("10.0.0.1:7000") == 0
    assert draft.sources(draft.join("10.0.0.2:17000")) == ["10.0.0.1:17000", "10.0.0.100:17000"]
