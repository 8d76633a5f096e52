"""The dependency rules of ARCHITECTURE.md, checked on the source (direct imports) and at run time (transitive)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# (files, import prefixes they must not use, why)
RULES = [
    (
        "pipeline/cache/**/*.py",
        ("pipeline.targets", "pipeline.draft", "pipeline.train", "pipeline.evaluate", "pipeline.testing",
         "pipeline.dump", "pipeline.regenerate", "transformers"),
        "the cache knows no model family and no draft",
    ),
    (
        "pipeline/draft/**/*.py",
        ("pipeline.targets", "pipeline.train", "pipeline.evaluate", "pipeline.testing", "transformers"),
        "the draft learns from the cache, never from a model class",
    ),
    ("pipeline/train/**/*.py", ("pipeline.targets", "pipeline.evaluate", "pipeline.testing"), "stage two"),
    ("pipeline/evaluate/**/*.py", ("pipeline.train", "pipeline.testing"), "evaluation needs no training code"),
    ("stages/train_draft.py", ("pipeline.targets", "pipeline.testing"), "stage two"),
    (
        "pipeline/inputs/**/*.py",
        ("pipeline.targets", "pipeline.cache", "pipeline.draft", "pipeline.train", "pipeline.evaluate",
         "pipeline.testing", "pipeline.dump", "pipeline.regenerate"),
        "inputs know nothing of models, caches or drafts",
    ),
    ("pipeline/*.py", ("pipeline.testing", "stages"), "the product never imports the test targets or stages"),
    ("pipeline/[!t]*/**/*.py", ("pipeline.testing", "stages"), "the product never imports the test targets"),
    ("pipeline/targets/**/*.py", ("pipeline.testing", "stages"), "the product never imports the test targets"),
    ("pipeline/train/**/*.py", ("stages",), "the library never imports stages"),
    ("pipeline/testing/**/*.py", ("stages",), "the library never imports stages"),
    ("stages/*.py", ("pipeline.testing",), "the product never imports the test targets"),
]  # fmt: skip


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("pattern, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_import_rules(pattern: str, forbidden: tuple[str, ...], why: str) -> None:
    files = sorted(REPO.glob(pattern))
    assert files, f"no file matches {pattern}"
    broken = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in files
        for name in imports_of(path)
        if any(name == f.rstrip(".") or name.startswith(f.rstrip(".") + ".") for f in forbidden)
    ]
    assert not broken, f"{why}: " + "; ".join(broken)


def loaded_modules(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_stage_two_loads_no_target_code() -> None:
    """Transitively too: training and exporting a draft import no target adapter and no test target."""
    loaded = loaded_modules("stages.train_draft")
    assert not {m for m in loaded if m.startswith(("pipeline.targets", "pipeline.testing", "pipeline.evaluate"))}


def test_the_cache_loads_no_model_code() -> None:
    loaded = loaded_modules("pipeline.cache")
    model_code = ("pipeline.targets", "pipeline.draft", "pipeline.train", "pipeline.testing", "stages", "transformers")
    assert not {m for m in loaded if m.startswith(model_code)}


def test_only_the_target_adapters_name_a_model_family() -> None:
    allowed = ("pipeline/targets/", "pipeline/testing/")
    mentions = [
        str(path.relative_to(REPO))
        for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/**/*.py")]
        if not str(path.relative_to(REPO)).startswith(allowed)
        and re.search(r"qwen2[-_ ]?audio|qwen3[-_ ]?omni", path.read_text(), re.I)  # every family with an adapter
    ]
    assert not mentions, f"model-family names outside pipeline/targets/: {mentions}"
