"""Angular distance and block influence against a direct computation from output_hidden_states;
the prune command; the real-model check on SmolLM2-135M."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from lm_helpers import corpus, tiny_llama, write_jsonl
from PIL import Image
from smollm2 import smollm2_dir
from surgery_cli.main import main
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery import load
from surgery.data import read_records
from surgery.evaluate import evaluate, load_model, score_layers
from surgery.methods.layers import drop_layers
from surgery.prune import prune

DATA = Path(__file__).parent / "data" / "calibration.jsonl"


def test_scores_equal_direct_hidden_state_computation(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "m", layers=6)
    texts = corpus(5, seed=2)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    model, tok = load_model(model_dir, "perplexity", "cpu")
    n = 2
    scores = score_layers(model, tok, read_records(data), n, batch_size=2)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    L = 6
    ang = torch.zeros(L - n + 1, dtype=torch.float64)
    bi_sum, count = torch.zeros(L, dtype=torch.float64), 0
    for t in texts:  # one unpadded sample at a time
        ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)(t)["input_ids"]])
        with torch.no_grad():
            hs = list(ref(ids, output_hidden_states=True).hidden_states)
        # hidden_states[L] is after the final norm; the last block's own output is the same
        # forward pass with the norm replaced by the identity.
        final = ref.model.norm
        ref.model.norm = torch.nn.Identity()
        with torch.no_grad():
            hs[L] = ref(ids, output_hidden_states=True).hidden_states[L]
        ref.model.norm = final
        last = torch.stack([h[0, -1] for h in hs])
        cos = F.cosine_similarity(last[:L - n + 1], last[n:], dim=-1)
        ang += (torch.arccos(cos.clamp(-1, 1)) / math.pi).double()
        for layer in range(L):
            bi_sum[layer] += (1 - F.cosine_similarity(hs[layer][0], hs[layer + 1][0], dim=-1)
                              ).double().sum()
        count += ids.shape[1]
    assert scores.angular == pytest.approx((ang / len(texts)).tolist(), abs=1e-5)
    assert scores.block_influence == pytest.approx((bi_sum / count).tolist(), abs=1e-5)
    start = min(range(len(scores.angular)), key=scores.angular.__getitem__)
    assert scores.drop("angular") == [start, start + 1]
    lowest = sorted(range(L), key=scores.block_influence.__getitem__)[:n]
    assert scores.drop("block_influence") == sorted(lowest)


def test_prune_cli_writes_model_scores_and_plot(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "m", layers=6)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(6, seed=3)])
    out, png = tmp_path / "pruned", tmp_path / "scores.png"
    r = CliRunner().invoke(main, ["prune", str(model_dir), "--blocks", "2", "--data", str(data),
                                  "--out", str(out), "--plot", str(png), "-q"])
    assert r.exit_code == 0, r.output
    scores = json.loads((out / "layer_scores.json").read_text())
    dropped = scores["drop"]["angular"]
    assert len(scores["angular_distance"]) == 5 and len(scores["block_influence"]) == 6
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    pruned = AutoModelForCausalLM.from_pretrained(out)
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    kept = [i for i in range(6) if i not in dropped]
    for new, old in enumerate(kept):
        assert torch.equal(pruned.model.layers[new].mlp.up_proj.weight,
                           full.model.layers[old].mlp.up_proj.weight)
    assert "## Block pruning" in (out / "README.md").read_text()
    assert Image.open(png).size[0] > 500


@pytest.mark.slow
def test_smollm2_angular_pruning_beats_dropping_last_blocks(tmp_path: Path) -> None:
    model_dir = smollm2_dir()
    res = prune(model_dir, 2, DATA, tmp_path / "angular", device="cpu", batch_size=4)
    L = len(res.scores.block_influence)
    last = drop_layers(load(model_dir), [L - 2, L - 1]).save(tmp_path / "last", device="cpu")
    ppl_angular = evaluate(res.saved.path, DATA, "perplexity", device="cpu").value
    ppl_last = evaluate(last.path, DATA, "perplexity", device="cpu").value
    assert res.dropped != [L - 2, L - 1]
    assert ppl_angular < ppl_last, (res.dropped, ppl_angular, ppl_last)
