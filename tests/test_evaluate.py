"""Data loading, perplexity against a direct transformers computation, the eval CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lm_helpers import corpus, tiny_llama, write_jsonl
from surgery_cli.main import main
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.data import read_records, subsample
from surgery.errors import DataError
from surgery.evaluate import evaluate


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: 'text' must be a string"):
        read_records(p)
    p.write_text('{"text": "a"}\n{"prompt": "x"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_records(p)
    p.write_text('{"text": "a"}\n{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: a completion record in a file of text"):
        read_records(p)


def test_subsample_is_seeded_and_ordered(tmp_path: Path) -> None:
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(50)]))
    a, b = subsample(recs, 10, seed=3), subsample(recs, 10, seed=3)
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.line for r in a] == sorted(r.line for r in a)
    assert [r.text for r in subsample(recs, 10, seed=4)] != [r.text for r in a]


def _direct_nll(model_dir: Path, rows: list[dict]) -> tuple[float, int]:
    """Sum of completion-token NLL, one unpadded example at a time, via transformers' loss."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * len(c)
        count += len(c)
    return total, count


def test_perplexity_equals_direct_transformers(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path / "m")
    texts = corpus(10)
    rows = [{"prompt": t.split()[0] + " " + t.split()[1], "completion": " " + " ".join(
        t.split()[2:])} for t in texts]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    res = evaluate(model, data, "perplexity", batch_size=4, device="cpu")
    total, count = _direct_nll(model, rows)
    assert res.tokens == count
    assert res.value == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_cli_prints_and_writes_json(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(6)])
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(model), "--data", str(data), "--metric",
                                  "perplexity", "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert f"perplexity: {doc['value']:.6g} (6 samples" in r.output
    assert doc["value"] == pytest.approx(evaluate(model, data, "perplexity").value, rel=1e-6)
    bad = CliRunner().invoke(main, ["eval", str(model), "--data", str(tmp_path / "no.jsonl")])
    assert bad.exit_code == 2 and "no.jsonl: cannot read data file" in bad.output


def test_exact_match_counts_greedy_generations(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = corpus(4, seed=1)
    rows = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        gen = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append({"prompt": p, "completion": text if i % 2 == 0 else "zzz"})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert evaluate(model_dir, data, "exact_match", batch_size=3).value == pytest.approx(0.5)
