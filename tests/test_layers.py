"""The package's layers: import arrows point one way, and the library never imports vLLM.

    lmcache_fs.connector   the vLLM adapter (connector/): may use everything below
    lmcache_fs.ops         the operator's tools: storage, config, the base modules
    lmcache_fs.transfer    moving chunks into vLLM's paged cache: storage, gpu, config (the
                           read settings' types)
    lmcache_fs.config      settings: storage (the integrity key)
    lmcache_fs.gpu         CUDA kernels and device helpers: nothing else
    lmcache_fs.storage     chunk files on a shared directory: nothing else
    log, progress, model_identity: nothing else

One arrow points up, on purpose: ``lmcache-fs pin --prompt`` computes a prompt's
keys with vLLM's own hash functions, which only the adapter may import
(``lmcache_fs.connector.prompt_keys``), lazily inside the command.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lmcache_fs"

BASE = {"lmcache_fs", "lmcache_fs.log", "lmcache_fs.progress", "lmcache_fs.model_identity"}
ALLOWED = {  # a layer: the layers (package prefixes) it may import from
    "lmcache_fs.storage": {"lmcache_fs.storage"},
    "lmcache_fs.gpu": {"lmcache_fs.gpu"},
    "lmcache_fs.config": {"lmcache_fs.storage"},
    "lmcache_fs.transfer": {"lmcache_fs.transfer", "lmcache_fs.storage", "lmcache_fs.gpu",
                            "lmcache_fs.config"},
    "lmcache_fs.ops": {"lmcache_fs.ops", "lmcache_fs.storage", "lmcache_fs.config"} | BASE,
}
EXCEPTIONS = {("lmcache_fs.ops.cli", "lmcache_fs.connector.prompt_keys")}


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def _imports(module: str) -> set[str]:
    """Every lmcache_fs module ``module`` imports, at the top or inside a function."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmcache_fs"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in _modules()
                      else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lmcache_fs")}
    return found


def _layer(module: str) -> str:
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down_the_layers(module):
    layer = _layer(module)
    allowed = ALLOWED.get(layer, set())
    wrong = sorted(i for i in _imports(module)
                   if (module, i) not in EXCEPTIONS and i not in BASE
                   and not any(i == a or i.startswith(a + ".") for a in allowed))
    assert not wrong, f"{module} ({layer}) may not import {wrong}"


def test_the_library_never_imports_vllm():
    # Every module of lmcache_fs (the adapter aside) imports with vLLM made unimportable.
    modules = [m for m in _modules()]
    code = ("import sys, importlib\n"
            "sys.modules['vllm'] = None  # any `import vllm...` now raises ImportError\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "assert not [m for m in sys.modules if m.startswith('vllm.')], 'vllm was imported'\n"
            "print('ok', len(" + repr(modules) + "))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
