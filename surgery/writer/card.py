"""The model card (README.md): Hub metadata in YAML front matter, then a readable account of
how the weights were made, from the provenance record."""

from __future__ import annotations

import json
from typing import Any

import yaml

from surgery.checkpoint.hub import parse_hub_id

_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)


def pipeline_tag(config: dict) -> str | None:
    for arch in config.get("architectures") or []:
        for suffix, tag in _PIPELINES:
            if str(arch).endswith(suffix):
                return tag
    return None


def front_matter(provenance: dict[str, Any], config: dict) -> dict[str, Any]:
    bases = []
    for item in provenance["inputs"]:
        ref = parse_hub_id(item["source"])
        if ref is not None and not item.get("local"):
            bases.append(ref.repo_id)
    ops = sorted({op for op in provenance.get("operations", []) if op != "load"})
    meta: dict[str, Any] = {}
    if bases:
        meta["base_model"] = list(dict.fromkeys(bases))
        if len(meta["base_model"]) > 1 or any(op in MERGE_OPS for op in ops):
            meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    tag = pipeline_tag(config)
    if tag:
        meta["pipeline_tag"] = tag
    meta["tags"] = ["weight-surgery", *ops]
    return meta


MERGE_OPS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
             "greedy_soup"}


def render_card(provenance: dict[str, Any], config: dict, recipe_text: str | None,
                references: dict[str, str], title: str) -> str:
    meta = front_matter(provenance, config)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += ["Made with [weight-surgery](https://pypi.org/project/weight-surgery/) from the "
              "inputs below.", "", "## Inputs", ""]
    for item in provenance["inputs"]:
        rev = f" @ `{item['revision']}`" if item.get("revision") else ""
        lines.append(f"- `{item['source']}`{rev}")
        for f in item["files"]:
            digest = f.get("sha256") or f"header {f['header_sha256']}"
            lines.append(f"  - `{f['name']}`: sha256 `{digest}`")
    ops = [op for op in provenance.get("operations", []) if op != "load"]
    if ops:
        lines += ["", "## Methods", ""]
        for op in dict.fromkeys(ops):
            ref = references.get(op)
            lines.append(f"- `{op}`" + (f": {ref}" if ref else ""))
    if recipe_text:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```"]
    else:
        lines += ["", "## Expression", "", "```json",
                  json.dumps(provenance["expression"], indent=2), "```"]
    for section, body in provenance.get("sections", {}).items():
        lines += ["", f"## {section}", "", body.rstrip()]
    lines += ["", "## Reproduce", "",
              f"weight-surgery {provenance['toolkit']['version']}, torch "
              f"{provenance['versions'].get('torch')}, seed {provenance['seed']}. "
              "The same recipe and inputs give byte-identical shards; `provenance.json` holds "
              "the full record.", ""]
    return "\n".join(lines)
