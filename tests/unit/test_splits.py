"""Slide-level folds of the downstream benchmark: the three leakage rules hold for any
slides and any synthetic provenance (hypothesis), and bad input is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.integration.errors import InputError
from histosynth.integration.splits import (
    LabelledTile,
    fold_tiles,
    leaks,
    read_split_file,
    slide_folds,
    write_split_file,
)


def tile(i: int, group: str, kind: str = "extracted", background: str | None = None):
    return LabelledTile(f"t{i}", Path(f"/x/{i}.png"), None, "Vessel", kind, group,
                        background or group)


@settings(max_examples=150, deadline=None)
@given(
    n_slides=st.integers(3, 12),
    folds=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    real=st.lists(st.integers(0, 11), min_size=1, max_size=40),
    fakes=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=30),
)
def test_no_fold_ever_leaks(n_slides, folds, seed, real, fakes):
    slides = [f"s{k}" for k in range(n_slides)]
    real_tiles = [tile(i, slides[k % n_slides]) for i, k in enumerate(real)]
    fake_tiles = [tile(100 + i, slides[a % n_slides], "inpainting", slides[b % n_slides])
                  for i, (a, b) in enumerate(fakes)]
    made = slide_folds(slides, folds, seed=seed)
    assert len(made) == folds
    for fold in made:
        # every slide on exactly one side, none empty
        assert fold.train | fold.val | fold.test == set(slides)
        assert not (fold.train & fold.val or fold.train & fold.test or fold.val & fold.test)
        assert fold.train and fold.val and fold.test
        assigned = fold_tiles(fold, real_tiles, fake_tiles)
        assert leaks(assigned) == []
        held = fold.val | fold.test
        # a synthetic tile is trained on exactly when none of its slides is held out
        assert {t.id for t in assigned.train_synthetic} == {
            t.id for t in fake_tiles if not (t.slides & held)
        }
        assert len(assigned.train_synthetic) + len(assigned.excluded) == len(fake_tiles)
        assert all(not t.synthetic for t in assigned.val + assigned.test)
    assert made == slide_folds(list(reversed(slides)), folds, seed=seed)  # order-free, seeded


def test_the_leak_check_finds_each_rule_broken():
    fold = slide_folds(["a", "b", "c"], 1)[0]
    train, val, test = (next(iter(s)) for s in (fold.train, fold.val, fold.test))
    good = fold_tiles(fold, [tile(0, train), tile(1, val), tile(2, test)],
                      [tile(3, train, "inpainting", val)])
    assert leaks(good) == [] and [t.id for t, _ in good.excluded] == ["t3"]
    assert "uses held-out slide(s)" in good.excluded[0][1]
    good.val.append(tile(4, train))  # a training slide's tile in validation
    good.test.append(tile(5, test, "variation"))  # a synthetic tile in the test set
    good.train_synthetic.append(tile(6, train, "inpainting", test))  # background held out
    problems = " | ".join(leaks(good))
    assert "in both train and val" in problems
    assert "synthetic tile(s) t5 in test" in problems
    assert "synthetic tile t6 trained on but uses held-out slide(s)" in problems


def test_folds_rotate_the_held_out_slides():
    slides = [f"s{k}" for k in range(10)]
    made = slide_folds(slides, 10, seed=3)
    assert all(len(f.test) == len(f.val) == 2 and len(f.train) == 6 for f in made)
    # rotated by one slide per fold: every slide is tested, and equally often
    times = {s: sum(s in f.test for f in made) for s in slides}
    assert set(times.values()) == {2}


@pytest.mark.parametrize(
    ("slides", "folds", "split", "match"),
    [
        (["a", "b"], 2, (0.7, 0.15, 0.15), "needs at least 3"),
        (["a"], 2, (0.7, 0.15, 0.15), "from 1 slide"),
        (["a", "b", "c"], 0, (0.7, 0.15, 0.15), "--folds"),
        (["a", "b", "c"], 2, (0.7, 0.3), "three positive fractions"),
        (["a", "b", "c"], 2, (0.7, 0.2, 0.2), "summing to 1"),
    ],
)
def test_bad_splits_are_one_clear_error(slides, folds, split, match):
    with pytest.raises(InputError, match=match):
        slide_folds(slides, folds, split)


def test_a_synthetic_tile_in_the_real_set_is_refused():
    fold = slide_folds(["a", "b", "c"], 1)[0]
    with pytest.raises(InputError, match="pass synthetic tiles with --synthetic"):
        fold_tiles(fold, [tile(0, "a", "inpainting")])


def test_the_split_file_records_every_fold(tmp_path):
    made = slide_folds(["a", "b", "c", "d"], 2, seed=1)
    real = [tile(i, s) for i, s in enumerate("abcd")]
    fake = [tile(10, "a", "inpainting", "b")]
    assigned = [fold_tiles(f, real, fake) for f in made]
    path = write_split_file(tmp_path / "splits.json", assigned, seed=1)
    doc = read_split_file(path)
    assert doc["seed"] == 1 and len(doc["rules"]) == 3 and len(doc["folds"]) == 2
    for record, a in zip(doc["folds"], assigned, strict=True):
        assert set(record["test"]) == {t.id for t in a.test}
        assert record["slides"]["test"] == sorted(a.fold.test)
        ids = {e["id"] for e in record["excluded_synthetic"]} | set(record["train_synthetic"])
        assert ids == {"t10"}
