"""Bad input to the fine-tune step: one line naming the file, option or recipe key, exit 2,
nothing written and nothing on disk damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.errors import UsageError
from surgery.train import finetune
from tests.conftest import FIXTURES, surgery

LLAMA = str(FIXTURES / "tiny-llama" / "base")
BERT = str(FIXTURES / "tiny-bert" / "base")
MATH = str(FIXTURES / "data" / "math.jsonl")
SENTIMENT = str(FIXTURES / "data" / "sentiment.jsonl")


def _fails(tmp_path: Path, *args: str) -> str:
    res = surgery("train", *args, "--out", "o", "-q", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize(("args", "message"), [
    ((LLAMA, "--data", "nope.jsonl", "--steps", "1"),
     "nope.jsonl: cannot read data file (No such file or directory)"),
    (("nope", "--data", MATH, "--steps", "1"), "MODEL: nope: no such file or directory"),
    ((LLAMA, "--data", SENTIMENT, "--steps", "1"),
     f"{SENTIMENT}: text+label records train a sequence classifier, but {LLAMA} is a causal "
     "language model (LlamaForCausalLM); give text or prompt+completion records"),
    ((BERT, "--data", MATH, "--steps", "1"),
     f"{MATH}: text or prompt+completion records train a causal language model, but {BERT} "
     "is a sequence classifier (BertForSequenceClassification); give text+label records"),
    ((LLAMA, "--data", MATH, "--steps", "1", "--trainable", "*nothing*"),
     "trainable: '*nothing*' matches no parameter of the model"),
    ((LLAMA, "--data", MATH, "--steps", "1", "--set", "objective=dtf"),
     "--objective: Input should be 'sft', 'dft', 'asft', 'masked_thought' or 'sorted' "
     "(got 'dtf'); did you mean 'dft'?"),
    ((LLAMA, "--data", MATH, "--steps", "1", "--set", "lrr=0.1"),
     "--lrr: unknown key; did you mean 'lr'?"),
    ((LLAMA, "--data", MATH, "--steps", "1", "--set", "mask_prob=0.3"),
     "mask_prob applies to objective masked_thought, not sft"),
    ((LLAMA, "--data", MATH), "give exactly one of steps and epochs"),
    ((LLAMA, "--data", MATH, "--steps", "1", "--objective", "sorted", "--set", "exit_every=9"),
     "exit_every 9 is more than the model's 6 blocks"),
    ((BERT, "--data", SENTIMENT, "--steps", "1", "--objective", "sorted"),
     "objective sorted trains causal language models; the data is text+label (a classifier)"),
    ((LLAMA, "--data", MATH, "--steps", "1", "--max-length", "3"),
     f"{MATH}: every example loses its whole completion to truncation at max_length 3; "
     "raise max_length"),
])
def test_bad_train_arguments(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    assert _fails(tmp_path, *args) == message


def test_empty_and_malformed_data_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 3}\n')
    assert _fails(tmp_path, LLAMA, "--data", "empty.jsonl", "--steps", "1") == \
        "empty.jsonl: no records"
    assert _fails(tmp_path, LLAMA, "--data", "bad.jsonl", "--steps", "1") == \
        "bad.jsonl:2: keys ['prompt'] are not one of text | prompt+completion | text+label"


def test_plan_checks_the_data_with_the_yaml_location(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b", "label": 1}\n')
    (tmp_path / "r.yaml").write_text(
        f"inputs: {{m: {LLAMA}}}\n"
        "steps:\n"
        "  t: {op: finetune, model: m, data: bad.jsonl, steps: 1}\n"
        "output: {from: t, path: o}\n")
    res = surgery("plan", "r.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: r.yaml:3:3: steps.t: bad.jsonl:2: a label record in "
                                  "a file of text records (line 1)")


def test_a_data_step_is_not_a_model_and_a_model_is_not_data(tmp_path: Path) -> None:
    head = (f"inputs: {{m: {LLAMA}}}\nsteps:\n"
            f"  d: {{op: distill_data, teacher: m, data: {MATH}}}\n")
    (tmp_path / "a.yaml").write_text(head + "  t: {op: finetune, model: d, data: d, steps: 1}\n"
                                     "output: {from: t, path: o}\n")
    (tmp_path / "b.yaml").write_text(head + "  t: {op: finetune, model: m, data: m, steps: 1}\n"
                                     "output: {from: t, path: o}\n")
    (tmp_path / "c.yaml").write_text(head + "output: {from: d, path: o}\n")
    errors = [surgery("plan", f, cwd=tmp_path).stderr.strip() for f in ("a.yaml", "b.yaml",
                                                                        "c.yaml")]
    assert errors == [
        "error: a.yaml:4:21: steps.t.model: step 'd' yields data, not a model",
        "error: b.yaml:4:31: steps.t.data: 'm' is a model; give a JSONL file or a step that "
        "yields data (distill_data)",
        "error: c.yaml:4:10: output.from: step 'd' yields data, not a model",
    ]


def test_existing_output_is_kept_and_nothing_trains_without_force(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = surgery("train", LLAMA, "--data", MATH, "--out", "o", "--steps", "1", "-q",
                  cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {out}: already exists; pass --force (force=True) to " \
        "replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() \
        == "mine"
    with pytest.raises(UsageError, match="already exists"):
        finetune(LLAMA, MATH, out=out, steps=1)


def test_python_api_names_an_unknown_setting() -> None:
    with pytest.raises(UsageError, match=r"^finetune: unknown parameter 'batchsize'; did you "
                       r"mean 'batch_size'\?$"):
        finetune(LLAMA, MATH, out="never", steps=1, batchsize=4)
    with pytest.raises(UsageError, match=r"^finetune: lr: Input should be greater than 0$"):
        finetune(LLAMA, MATH, out="never", steps=1, lr=0)
