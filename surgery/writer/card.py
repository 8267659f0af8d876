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


def hub_inputs(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """(repo id, commit) of each input read from the Hub; local inputs have no revision."""
    out = []
    for item in provenance["inputs"]:
        ref = parse_hub_id(item["source"])
        if ref is not None and item.get("revision"):
            out.append((ref.repo_id, item["revision"]))
    return list(dict.fromkeys(out))


def is_merge(provenance: dict[str, Any]) -> bool:
    ops = set(provenance.get("operations", []))
    return len(provenance["inputs"]) > 1 or bool(ops & MERGE_OPS)


def front_matter(provenance: dict[str, Any], config: dict) -> dict[str, Any]:
    """Hub metadata. ``base_model`` takes repo ids only, so the pinned revisions are given in
    the card's body (and in provenance.json)."""
    bases = list(dict.fromkeys(repo for repo, _ in hub_inputs(provenance)))
    ops = sorted({op for op in provenance.get("operations", []) if op != "load"})
    meta: dict[str, Any] = {}
    if bases:
        meta["base_model"] = bases
        if is_merge(provenance):
            meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    tag = pipeline_tag(config)
    if tag:
        meta["pipeline_tag"] = tag
    meta["tags"] = ["weight-surgery", *(["merge"] if is_merge(provenance) else []), *ops]
    return meta


MERGE_OPS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
             "greedy_soup"}


def render_card(provenance: dict[str, Any], config: dict, recipe_text: str | None,
                references: dict[str, str], title: str) -> str:
    meta = front_matter(provenance, config)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    ops = [op for op in provenance.get("operations", []) if op != "load"]
    what = "A merge" if is_merge(provenance) else "A transformation"
    lines += [f"{what} of {len(provenance['inputs'])} model(s) made with "
              "[weight-surgery](https://pypi.org/project/weight-surgery/)"
              + (f" using {', '.join(f'`{op}`' for op in dict.fromkeys(ops))}." if ops else "."),
              "", "## Inputs", ""]
    for item in provenance["inputs"]:
        rev = f" at commit `{item['revision']}`" if item.get("revision") else " (local files)"
        lines.append(f"- `{item['source']}`{rev}")
        for f in item["files"]:
            digest = f.get("sha256") or f"header {f['header_sha256']}"
            lines.append(f"  - `{f['name']}`: sha256 `{digest}`")
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
              f"{provenance['versions'].get('torch')}, computed on the {provenance['device']}, "
              f"seed {provenance['seed']}. "
              "The same recipe and inputs give byte-identical shards on the same kind of "
              "device; `provenance.json` holds the full record.", ""]
    return "\n".join(lines)
