"""The docs tell the truth about the repository: every tool, config and file path that README.md
and docs/*.md name exists, every config key they name exists (``add_detr_config`` or Detectron2's
defaults), and every relative link resolves."""

import re

import pytest
from detectron2.config import get_cfg

from detr_d2 import add_detr_config

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KEY = re.compile(r"\b((?:MODEL|SOLVER|INPUT|TEST|DATASETS|DATALOADER)(?:\.[A-Z][A-Z0-9_]*)+)")
PATH = re.compile(r"(?<![\w/.-])((?:tools|configs|docs|detr_d2|tests|d2)/[\w./{},*-]*[\w}*])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def doc_ids():
    return [str(p.relative_to(REPO)) for p in DOCS]


def brace_expand(pattern: str) -> str:
    """A glob for a shell-style ``a{_x,}b`` pattern: each brace group as ``*``."""
    return re.sub(r"\{[^}]*\}", "*", pattern)


def config_has(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_named_config_keys_exist(doc):
    cfg = get_cfg()
    add_detr_config(cfg)
    text = doc.read_text()
    missing = sorted({k for k in KEY.findall(text) if not config_has(cfg, k.rstrip("."))})
    assert not missing, f"{doc.name} names config keys that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_named_paths_exist(doc):
    text = doc.read_text()
    missing = set()
    for match in PATH.finditer(text):
        path = match.group(1)
        if "Detectron2" in text[max(0, match.start() - 30) : match.start()]:
            continue  # a file of Detectron2's repository (tools/lazyconfig_train_net.py)
        found = list(REPO.glob(brace_expand(path))) if any(c in path for c in "*{") else []
        if not (found or (REPO / path).exists()):
            missing.add(path)
    assert not missing, f"{doc.name} names paths that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_relative_links_resolve(doc):
    text = doc.read_text()
    broken = [
        link
        for link in LINK.findall(text)
        if not re.match(r"^[a-z]+://|^mailto:", link) and not (doc.parent / link).exists()
    ]
    assert not broken, f"{doc.name} links to missing files: {broken}"
