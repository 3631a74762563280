"""Shared fixtures of the deployment tests: the chart rendered offline for
every values file (helm-python-sdk embeds Helm; no binary, no cluster)."""

import copy
import functools
import os
import re

import helm_python as helm
import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(REPO, "deploy", "helm", "casebook")
EXAMPLES = os.path.join(REPO, "deploy", "helm", "examples")
SCHEMAS = os.path.join(os.path.dirname(__file__), "schemas")
RELEASE = "casebook"
NAMESPACE = "support-test"
ENVIRONMENTS = ["default", "dev", "staging", "prod"]
ROLES = ["api", "relay", "projector", "agent", "delivery"]

helm.disable_logging()


def values_for(env):
    if env == "default":
        return {}
    with open(os.path.join(CHART, f"values-{env}.yaml")) as f:
        return yaml.safe_load(f) or {}


def deep_merge(base, override):
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def render_raw(values):
    """template path -> rendered text."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def documents(rendered):
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                docs.append(doc)
    return docs


@functools.lru_cache(maxsize=None)
def _rendered(env):
    return documents(render_raw(values_for(env)))


@pytest.fixture(params=ENVIRONMENTS)
def env(request):
    return request.param


@pytest.fixture
def manifests(env):
    """The env's rendered documents (deep copies: tests may not share edits)."""
    return [strip(d) for d in _rendered(env)]


def strip(doc):
    doc = copy.deepcopy(doc)
    doc.pop("__template__", None)
    return doc


def all_rendered():
    """(env, document) for every environment."""
    return [(env, strip(d)) for env in ENVIRONMENTS for d in _rendered(env)]


def of_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def config_table_variables(markdown):
    """Every environment variable named in the first column of the
    '## Configuration' table(s) of a Markdown document. A name ending in
    '…' stands for the siblings of the cell with that prefix
    ('LLM_FALLBACK_PRICE_…' next to 'LLM_PRICE_USD_PER_MTOK_IN')."""
    section = re.split(r"^## Configuration[^\n]*\n", markdown, flags=re.M)
    if len(section) < 2:
        return set()
    body = re.split(r"^## ", section[1], flags=re.M)[0]
    names = set()
    for line in body.splitlines():
        if not line.startswith("|") or line.startswith("| ---") or line.startswith("| variable"):
            continue
        first = line.split("|")[1]
        cell = re.findall(r"`([^`]+)`", first)
        full = [n for n in cell if re.fullmatch(r"[A-Z][A-Z0-9_]+", n)]
        names.update(full)
        for n in cell:
            if n.endswith("…") or n.endswith("..."):
                prefix = n.rstrip(".…")
                word = prefix.rstrip("_").rsplit("_", 1)[-1] + "_"
                for sibling in full:
                    if word in sibling:
                        names.add(prefix + sibling.split(word, 1)[1])
    return names


def contract_path():
    for candidate in (os.environ.get("CASEBOOK_CONTRACT"),
                      os.path.join(REPO, "..", "shared", "CONTRACT.md"),
                      "/work/shared/CONTRACT.md"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None
