"""The names the documentation promises exist: `kervljepa_jax.<submodule>` for every listed
submodule, `kervljepa_jax.model`'s public API, and every `kervljepa_jax...` name that README.md, the
notebooks and the package's docstrings spell out."""

import ast
import re
from pathlib import Path

import pytest

import kervljepa_jax
from kervljepa_jax import model

ROOT = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"\bkervljepa_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
IMPORTS = re.compile(r"from (kervljepa_jax[\w.]*) import ([\w, ]+)")


def test_every_listed_submodule_imports():
    for name in kervljepa_jax._SUBMODULES:
        assert getattr(kervljepa_jax, name).__name__ == f"kervljepa_jax.{name}"
    with pytest.raises(AttributeError):
        kervljepa_jax.no_such_module   # noqa: B018


def test_model_api():
    for name in model.__all__:
        assert getattr(model, name) is not None, name
    cfg = model.tiny(lora=model.LoraConfig(rank=2, alpha=4.0))
    assert isinstance(cfg, model.LlamaConfig) and model.Llama(cfg).cfg is cfg


def _top_level_names(path: Path) -> set[str]:
    """Names a module file defines or imports at top level (read, not imported: the entry points
    define absl flags when imported)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _resolves(dotted: str) -> bool:
    """`kervljepa_jax.a.b.name`: the longest prefix that is a module or package of the source tree,
    then the next part a name it defines (deeper attributes are not checked)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            if i == len(parts):
                return True
            child = base / parts[i]
            return (child.with_suffix(".py").is_file() or (child / "__init__.py").is_file()
                    or parts[i] in _top_level_names(module))
    return False


def _documents():
    yield from [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    for path in sorted((ROOT / "kervljepa_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        yield from ((path, ast.get_docstring(node) or "") for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)))


def test_names_the_documents_spell_out_exist():
    missing = []
    for doc in _documents():
        source, text = (doc, doc.read_text()) if isinstance(doc, Path) else doc
        for dotted in set(DOTTED.findall(text)):
            if not dotted.endswith(("_", ".py")) and not _resolves(dotted.rstrip(".")):
                missing.append(f"{source.name}: {dotted}")
        for module, names in IMPORTS.findall(text):
            missing += [f"{source.name}: from {module} import {n}" for n in map(str.strip, names.split(","))
                        if n and not _resolves(f"{module}.{n}")]
    assert not missing, sorted(set(missing))
