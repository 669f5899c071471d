"""embseg bench's search part: knn_classes against faiss's IndexFlatL2 (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embseg import bench
from embseg.bench import search


def _tiny_settings(*, quick: bool, gpu_sizes: bool, device: str) -> bench.BenchSettings:
    return bench.BenchSettings(device="cpu", steps=[], search_classes=(40, 300),
                               search_pixels=1500, search_calls=2, search_rounds=2)


@pytest.mark.skipif(not search.faiss_available(),
                    reason="faiss is not installed (pip install 'embseg[bench]')")
def test_search_part_runs_on_tiny_sizes_and_the_ids_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.run, "settings_for", _tiny_settings)
    result = bench.run_bench(quick=True, gpu_sizes=False, out=tmp_path, json_path=None,
                             parts=("search",), log=lambda line: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["complete"] is True and saved["goals"] == result["goals"]
    rows = saved["search"]
    assert [(r["side"], r["classes"]) for r in rows] == [
        ("knn_classes", 40), ("faiss", 40), ("knn_classes", 300), ("faiss", 300)]
    for row in rows:
        assert row["rounds"] == 2 and row["calls"] == 4 and not row.get("error")
        assert 0 < row["min_seconds"] <= row["median_seconds"] and row["peak_bytes"] > 0
        assert row["ids"]["rows"] == 1500
        # random unit vectors have no exact ties: the same ids, row for row
        assert row["ids"]["identical_rows"] == 1500
    assert [g["goal"] for g in saved["goals"]] == [
        "knn_classes at C=40 at least as fast as faiss IndexFlatL2 with the same ids",
        "knn_classes at C=300 at least as fast as faiss IndexFlatL2 with the same ids"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Nearest-class search: knn_classes vs faiss IndexFlatL2" in markdown
    assert "identical (1,500 rows)" in markdown


def test_differing_ids_are_checked_to_be_distance_ties():
    queries, table = search.search_data(6, 5, 4)
    table = torch.cat([table, table[:1]])  # class 5 is class 0 again: an exact tie
    knn = search._searcher("knn_classes", queries, table, 3, torch.device("cpu"))()
    swapped = knn.copy()
    zero, five = swapped == 0, swapped == 5
    swapped[zero], swapped[five] = 5, 0
    tie = search.compare_ids(knn, swapped, queries, table)
    assert tie["differing_rows"] > 0 and tie["differences_are_ties"]
    for row, wrong_ids in ((0, knn[0][::-1]),  # the right ids, not nearest first
                           (1, [*knn[1][:2], next(c for c in (1, 2, 3, 4) if c not in knn[1])])):
        wrong = knn.copy()
        wrong[row] = wrong_ids
        report = search.compare_ids(knn, wrong, queries, table)
        assert report["differing_rows"] == 1 and not report["differences_are_ties"], row
    assert search.compare_ids(knn, knn, queries, table)["identical_rows"] == 6


def test_without_faiss_the_part_measures_knn_classes_alone(tmp_path):
    settings = _tiny_settings(quick=True, gpu_sizes=False, device="cpu")
    lines, rows = [], []
    search.bench_search(settings, lines.append, rows, tmp_path, search._search_point,
                        have_faiss=False)
    assert [(r["side"], r["classes"]) for r in rows] == [("knn_classes", 40),
                                                         ("knn_classes", 300)]
    assert all(r["ids"] is None and r["calls"] == 4 for r in rows)
    assert "faiss is not installed" in lines[0]
    result = {"search": rows, "search_peer_missing": "faiss is not installed"}
    assert search.goals(result) == []
    assert "No peer row: faiss is not installed." in search.markdown(result)
    saved = np.load(tmp_path / "search-knn_classes-40-0.npy")
    assert saved.shape == (1500, 8)
