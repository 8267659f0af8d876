"""Greedy soup rejects a planted bad ingredient, keeps helpful ones, and logs the scores;
coefficient search over a grid (task-arithmetic λ standing in for LiNeS's c)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_helpers import corpus, tiny_llama, trained_llama, write_jsonl
from PIL import Image

from surgery import load, task_arithmetic
from surgery.evaluate import CheckpointScorer, evaluate
from surgery.evaluate.plot import plot_soup_trajectory
from surgery.methods.coefficient_search import search_coefficient
from surgery.methods.greedy_soup import greedy_soup
from surgery.recipe import load_recipe, run_recipe
from tests.conftest import surgery


@pytest.fixture(scope="module")
def soup_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soup")
    tuned = trained_llama(root / "tuned", corpus(32, seed=5))
    paths = {"tuned": tuned, "base": tiny_llama(root / "base", seed=0)}
    for i in range(3):
        paths[f"good{i}"] = tiny_llama(root / f"good{i}", seed=10 + i, noise=0.03, base=tuned)
    paths["bad"] = tiny_llama(root / "bad", seed=20, noise=0.3, base=tuned)
    paths["data"] = write_jsonl(root / "heldout.jsonl", [{"text": t} for t in corpus(12, 6)])
    return paths


def test_greedy_soup_rejects_bad_keeps_good(soup_setup: dict[str, Path],
                                            tmp_path: Path) -> None:
    p = soup_setup
    names = ["bad", "good0", "good1", "good2"]
    scorer = CheckpointScorer(p["data"], "perplexity", device="cpu")
    soup = greedy_soup({n: load(p[n]) for n in names}, scorer, higher_is_better=False)
    saved = soup.save(tmp_path / "soup")
    result = soup.node.result
    log = result.decisions
    assert log[-1].candidate == "bad" and not log[-1].kept
    assert "bad" not in result.kept and len(result.kept) >= 2
    own = {n: evaluate(p[n], p["data"], "perplexity").value for n in names}
    assert [d.candidate for d in log] == sorted(names, key=own.__getitem__)
    best = log[0].soup_score
    for d in log:
        assert d.ingredient_score == pytest.approx(own[d.candidate], rel=1e-6)
        if d.step:
            assert d.kept == (d.soup_score < best)
            best = d.soup_score if d.kept else best
    assert evaluate(saved.path, p["data"], "perplexity").value == pytest.approx(result.score,
                                                                                rel=1e-5)
    prov = json.loads((saved.path / "provenance.json").read_text())
    assert prov["expression"]["decisions"][-1]["candidate"] == "bad"
    card = (saved.path / "README.md").read_text()
    assert "## Greedy soup" in card and "| `bad` |" in card
    png = plot_soup_trajectory([d.candidate for d in log], [d.soup_score for d in log],
                               [d.kept for d in log], "perplexity", tmp_path / "soup.png")
    assert Image.open(png).size[0] > 500


def test_greedy_soup_recipe_step(soup_setup: dict[str, Path], tmp_path: Path) -> None:
    p = soup_setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{a: {p['good0']}, b: {p['bad']}}}\n"
        f"steps:\n  s: {{op: greedy_soup, models: [a, b], data: {p['data']}, "
        f"metric: perplexity, accept: '>='}}\n"
        f"output: {{from: s, path: {tmp_path / 'out'}}}\n")
    (res,) = run_recipe(load_recipe(recipe))
    prov = json.loads((res.path / "provenance.json").read_text())
    decisions = prov["expression"]["decisions"]
    assert [(d["candidate"], d["kept"]) for d in decisions] == [("a", True), ("b", False)]
    assert "Greedy soup" in prov["sections"]


def test_apply_plot_draws_each_soup(soup_setup: dict[str, Path], tmp_path: Path) -> None:
    """`surgery apply --plot F.png` with two greedy-soup steps writes F-<step>.png for each."""
    p = soup_setup
    (tmp_path / "r.yaml").write_text(
        f"inputs: {{a: {p['good0']}, b: {p['bad']}, c: {p['good1']}}}\n"
        f"steps:\n  one: {{op: greedy_soup, models: [a, b], data: {p['data']}}}\n"
        f"  two: {{op: greedy_soup, models: [a, c], data: {p['data']}, max_samples: 4}}\n"
        "  both: {op: linear, models: [one, two]}\n"
        "output: [{from: both, path: out/both}, {from: one, path: out/one}]\n")
    res = surgery("apply", "r.yaml", "--plot", "plots/soup.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for step in ("one", "two"):
        png = tmp_path / "plots" / f"soup-{step}.png"
        assert f"plot: plots/soup-{step}.png" in res.stdout
        assert Image.open(png).format == "PNG" and png.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["soup-one.png",
                                                                       "soup-two.png"]


def test_coefficient_search_picks_best_grid_value(soup_setup: dict[str, Path],
                                                  tmp_path: Path) -> None:
    p = soup_setup
    scorer = CheckpointScorer(p["data"], "perplexity", device="cpu")
    base, tuned = load(p["base"]), load(p["tuned"])
    grid = [0.0, 0.5, 1.0]
    found = search_coefficient(lambda c: task_arithmetic(base, [tuned], lambda_=c), grid,
                               scorer, parameter="c", higher_is_better=False)
    direct = [r.value for r in scorer.results[:3]]
    assert found.scores == direct and len(set(direct)) == 3
    assert found.best == grid[direct.index(min(direct))]
    assert found.best_score == min(direct)
    saved = found.save(str(tmp_path / "chosen"))
    prov = json.loads((saved.path / "provenance.json").read_text())
    assert prov["coefficient_search"]["chosen"] == found.best
    assert prov["coefficient_search"]["scores"] == direct
