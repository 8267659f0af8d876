"""The recipe format, as pydantic models. Unknown keys are errors, never ignored.

```yaml
seed: 0
inputs:
  base: fixtures/tiny-llama/base          # a path or org/name@revision
  math: {path: fixtures/tiny-llama/math}
steps:
  merged: {op: task_arithmetic, base: base, models: [math], lambda: 0.5}
output: {from: merged, path: out/merged, dtype: bfloat16, shard_size: 2GB,
         push_to_hub: {repo: me/merged, private: true}}
```
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputSpec(Strict):
    path: str = Field(description="local directory, .safetensors file, or org/name[@revision]")
    allow_pickle: bool = Field(False, description="load .bin pickles with weights_only=True")


class PushSpec(Strict):
    repo: str = Field(description="org/name of the Hub repository (created if needed)")
    private: bool = False
    revision: str | None = Field(None, description="branch to commit to (default main)")


class OutputSpec(Strict):
    from_: str = Field(alias="from", description="the input or step to write")
    path: str
    dtype: str | None = Field(None, description="float32, bfloat16, float16 (default: as input)")
    shard_size: int | str = "5GB"
    device: str = "auto"
    tokenizer_from: str | None = Field(None, description="input whose tokenizer files to copy")
    push_to_hub: PushSpec | None = Field(None, description="upload the output when written")
    executor: Literal["local", "ray"] = Field(
        "local", description="ray: one Ray task per output shard (surgery apply --ray)")
    chat_template: str | None = Field(
        None, description="Jinja chat template written as the output's chat_template.jinja")


class ZeroRowSpec(Strict):
    kind: Literal["zero"]


class ModelRowSpec(Strict):
    kind: Literal["model_token"]
    model: str = Field(description="the input whose row to take")
    token_id: int | None = Field(None, ge=0, description="its row of this id")
    token: str | None = Field(None, description="its row of this token")

    @model_validator(mode="after")
    def _one(self) -> ModelRowSpec:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give token_id or token (one of them)")
        return self


def _source_kind(value: Any) -> str | None:
    """Which form a token's source takes: an input's name, or by its ``kind``."""
    if isinstance(value, str):
        return "input"
    if isinstance(value, dict):
        return value.get("kind")
    return getattr(value, "kind", None)


class TokenSpec(Strict):
    source: Annotated[
        Annotated[str, Tag("input")] | Annotated[ZeroRowSpec, Tag("zero")]
        | Annotated[ModelRowSpec, Tag("model_token")],
        Discriminator(_source_kind, custom_error_type="token_source",
                      custom_error_message="a token's source is an input, {kind: zero} or "
                      "{kind: model_token, model, token_id or token}")] = Field(
        description="an input (its row of the token), {kind: zero}, or {kind: model_token, "
                    "model, token_id or token}")
    force: bool = Field(False, description="also replace the rows of the inputs that have "
                        "the token")


class VocabularySpec(Strict):
    """Lay the inputs out in one vocabulary before any step (see surgery.methods.vocabulary);
    the outputs then take its tokenizer."""

    source: str = Field("union", description="union, or the input whose tokenizer to take")
    base: str | None = Field(None, description="the input whose row a token several models "
                             "have takes; the union starts from its tokenizer (default: the "
                             "first of models)")
    models: list[str] | None = Field(None, description="the inputs to lay out (default: all)")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="round the rows up to a "
                                           "multiple of this")
    tokens: dict[str, TokenSpec] | None = Field(
        None, description="tokens whose rows come from a source of their own (for the inputs "
        "that lack them; with force, for all)")

    def names(self, inputs: list[str]) -> list[str]:
        """The inputs it lays out, of the recipe's ``inputs``."""
        return self.models if self.models is not None else inputs


class RecipeDoc(Strict):
    seed: int = 0
    inputs: dict[str, str | InputSpec] = Field(min_length=1)
    vocabulary: VocabularySpec | None = Field(
        None, description="merge inputs with different tokenizers over one vocabulary")
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict)
    output: OutputSpec | list[OutputSpec]

    def outputs(self) -> list[OutputSpec]:
        return self.output if isinstance(self.output, list) else [self.output]

    def input_spec(self, name: str) -> InputSpec:
        spec = self.inputs[name]
        return spec if isinstance(spec, InputSpec) else InputSpec(path=spec)
