"""Self-data distillation's data (``distill_data``): each completion is the teacher's greedy
continuation, equal to transformers' own ``generate`` on that prompt alone; with ``chat`` the
prompt goes through the teacher's chat template, as the fine-tune step encodes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.data import Record
from surgery.errors import DataError
from surgery.train.data import IGNORE, encode_example
from surgery.train.distill import distill_data
from tests.conftest import ROOT, surgery

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["60-22=", "57+62=", "81-40=", "3+4=", "99-1=", "12+12="]


@pytest.fixture()
def teacher(tmp_path: Path) -> Path:
    """tiny-llama base (random weights: it rarely stops at once) with a chat template."""
    model = tmp_path / "teacher"
    shutil.copytree(ROOT / "fixtures" / "tiny-llama" / "base", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return model


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": "x"}) + "\n"
                            for p in PROMPTS))
    return path


def _alone(model: Path, text: str, special: bool) -> str:
    """transformers' greedy continuation of one unpadded prompt."""
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.tensor([tok(text, add_special_tokens=special)["input_ids"]])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                      do_sample=False, pad_token_id=pad)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("chat", [False, True])
def test_completions_equal_generate_on_each_prompt_alone(teacher: Path, tmp_path: Path,
                                                         chat: bool) -> None:
    out = tmp_path / f"distilled-{chat}.jsonl"
    res = distill_data(teacher, _data(tmp_path), out, max_new_tokens=5, batch_size=4,
                       device="cpu", chat=chat)  # batches of 4 and 2, left-padded
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert res.records == len(rows) and res.empty == len(PROMPTS) - len(rows)
    want = [_alone(teacher, f"<user>{p}</user><assistant>" if chat else p, not chat)
            for p in PROMPTS]
    assert [r["prompt"] for r in rows] == [p for p, w in zip(PROMPTS, want, strict=True) if w]
    assert [r["completion"] for r in rows] == [w for w in want if w]
    assert len(rows) >= 4  # the comparison compares something


def test_chat_examples_encode_the_prompt_as_distillation_gives_it(teacher: Path) -> None:
    """The fine-tune step's chat encoding: the rendered prompt (no special tokens added) is
    masked out of the labels, the template's answer and closing tag are the targets."""
    tok = AutoTokenizer.from_pretrained(teacher)
    enc, cut = encode_example(tok, Record(prompt="3+4=", completion="7"), 64, chat=True,
                              add_eos=True, where="t")
    prompt = tok("<user>3+4=</user><assistant>", add_special_tokens=False)["input_ids"]
    answer = tok("7</assistant>", add_special_tokens=False)["input_ids"]
    assert not cut and enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE] * len(prompt) + answer and enc.prompt_len == len(prompt)


def test_chat_without_a_template_fails_before_the_weights_load(tmp_path: Path) -> None:
    plain = ROOT / "fixtures" / "tiny-llama" / "math"
    with pytest.raises(DataError, match="chat is on, but the model's tokenizer has no chat "
                       "template"):
        distill_data(plain, _data(tmp_path), tmp_path / "o.jsonl", device="cpu", chat=True)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_and_recipe_take_chat(teacher: Path, tmp_path: Path) -> None:
    data = _data(tmp_path)
    res = surgery("distill-data", str(teacher), "--data", str(data), "--out", "cli.jsonl",
                  "--max-new-tokens", "5", "--chat", "--device", "cpu", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    api = tmp_path / "api.jsonl"
    distill_data(teacher, data, api, max_new_tokens=5, device="cpu", chat=True)
    assert (tmp_path / "cli.jsonl").read_text() == api.read_text()
    from surgery.recipe.build import build_recipe

    text = (f"inputs: {{t: {teacher}}}\nsteps:\n"
            f"  d: {{op: distill_data, teacher: t, data: {data}, max_new_tokens: 5, chat: true,"
            f" device: cpu}}\n"
            f"  s: {{op: finetune, model: t, data: d, steps: 1, chat: true, device: cpu}}\n"
            f"output: {{from: s, path: {tmp_path / 'o'}}}\n")
    recipe = build_recipe(text, "r.yaml")
    assert Path(recipe.values["d"].path).read_text() == api.read_text()
