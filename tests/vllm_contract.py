"""What the adapter (``connector/``) needs of vLLM, read from its own source, checked per release.

Everything is found by parsing, never by importing: the adapter's ``from vllm...
import`` lines, every attribute it reads (``x.name`` and ``getattr(x, "name")``),
and the methods of its connector class; a release is its published sources
(``vllm_sources.py``). Each check returns readable violations, so one test run
names every break of a release at once.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import symtable
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from packaging.version import Version
from vllm_sources import ReleaseSources

BASE_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.base"
CONNECTOR_BASES = ("KVConnectorBase_V1", "SupportsHMA")


@dataclass
class AdapterUse:
    """What the adapter's source uses of vLLM."""

    imports: set[tuple[str, str]] = field(default_factory=set)
    """(module, name) of every ``from vllm... import name``."""
    qualified: set[tuple[str, str, str]] = field(default_factory=set)
    """(module, name, attr) where the adapter reads ``name.attr`` of an imported name."""
    attributes: dict[str, set[str]] = field(default_factory=dict)
    """Every attribute name the adapter reads of any object, and the files that read it."""
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    """The connector class's methods."""


def adapter_use(files: Iterable[Path], connector_class: str) -> AdapterUse:
    """Parse the adapter's files; ``connector_class`` is the KV connector's class name."""
    use = AdapterUse()
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, tuple[str, str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    use.imports.add((node.module, alias.name))
                    bound[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Attribute):
                use.attributes.setdefault(node.attr, set()).add(path.name)
                if isinstance(node.value, ast.Name) and node.value.id in bound:
                    use.qualified.add((*bound[node.value.id], node.attr))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                use.attributes.setdefault(node.args[1].value, set()).add(path.name)
            elif isinstance(node, ast.ClassDef) and node.name == connector_class:
                use.methods = {f.name: f for f in node.body
                               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return use


def _top_level(body: Sequence[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, including those inside ``if``/``try`` blocks."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            yield from _top_level(stmt.body)
            yield from _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body)
            for handler in stmt.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(stmt.orelse)
        else:
            yield stmt


def _bound_names(stmt: ast.stmt) -> Iterator[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield stmt.name
    elif isinstance(stmt, ast.Assign):
        for target in stmt.targets:
            for node in ast.walk(target):
                if isinstance(node, ast.Name):
                    yield node.id
    elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        yield stmt.target.id
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
        for alias in stmt.names:
            yield (alias.asname or alias.name).split(".")[0]


def module_names(src: ReleaseSources, module: str) -> set[str]:
    """Names a module defines or imports at its top level."""
    tree = src.tree(module)
    if tree is None:
        return set()
    return {name for stmt in _top_level(tree.body) for name in _bound_names(stmt)}


def defines(src: ReleaseSources, module: str, name: str) -> bool:
    """``from module import name`` works in this release (a name or a submodule)."""
    return name in module_names(src, module) or src.path_of(f"{module}.{name}") is not None


def find_class(src: ReleaseSources, module: str, name: str) -> ast.ClassDef | None:
    tree = src.tree(module)
    if tree is None:
        return None
    return next((s for s in _top_level(tree.body) if isinstance(s, ast.ClassDef) and s.name == name),
                None)


def _import_origin(src: ReleaseSources, module: str, name: str) -> str | None:
    """The module ``name`` was imported from at the top of ``module``, if it was."""
    tree = src.tree(module)
    for stmt in _top_level(tree.body if tree else []):
        if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            if any((a.asname or a.name) == name for a in stmt.names):
                return stmt.module
    return None


def class_members(src: ReleaseSources, module: str, name: str) -> set[str]:
    """Fields, methods, properties and ``self.x`` attributes of a class and its vLLM bases."""
    cls = find_class(src, module, name)
    if cls is None:
        return set()
    members: set[str] = set()
    for stmt in cls.body:
        members.update(_bound_names(stmt))
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(stmt):
                targets = (node.targets if isinstance(node, ast.Assign) else
                           [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                members.update(t.attr for t in targets if isinstance(t, ast.Attribute)
                               and isinstance(t.value, ast.Name) and t.value.id == "self")
    for base in cls.bases:
        base_name = base.id if isinstance(base, ast.Name) else None
        if base_name is None or base_name == name:
            continue
        origin = module if find_class(src, module, base_name) else _import_origin(src, module, base_name)
        if origin is not None and origin.split(".")[0] == "vllm":
            members |= class_members(src, origin, base_name)
    return members


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    args = fn.args
    return (tuple(a.arg for a in (*args.posonlyargs, *args.args)),
            tuple(a.arg for a in args.kwonlyargs), args.kwarg is not None)


def _is_abstract(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any((isinstance(d, ast.Name) and d.id == "abstractmethod")
               or (isinstance(d, ast.Attribute) and d.attr == "abstractmethod")
               for d in fn.decorator_list)


def _hooks(src: ReleaseSources) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    hooks = {}
    for base in CONNECTOR_BASES:
        cls = find_class(src, BASE_MODULE, base)
        assert cls is not None, f"vLLM {src.version} has no {base} in {BASE_MODULE}"
        hooks.update({f.name: f for f in cls.body
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))})
    return hooks


@dataclass(frozen=True)
class Declared:
    """A difference between releases that the compatibility module declares."""

    release: str
    module: str  # dotted
    owner: str
    member: str
    added: bool

    def exists_in(self, version: str) -> bool:
        """Whether ``member`` should exist in release ``version``."""
        later = Version(version) >= Version(self.release)
        return later if self.added else not later


def import_violations(use: AdapterUse, src: ReleaseSources) -> list[str]:
    out = [f"`from {m} import {n}`: vLLM {src.version} has no {n} there"
           for m, n in sorted(use.imports) if not defines(src, m, n)]
    for module, name, attr in sorted(use.qualified):
        if src.path_of(f"{module}.{name}") is not None:  # a module: its top-level names
            if attr not in module_names(src, f"{module}.{name}"):
                out.append(f"`{name}.{attr}`: vLLM {src.version}'s {module}.{name} has no {attr}")
        elif find_class(src, module, name) is not None:
            if attr not in class_members(src, module, name):
                out.append(f"`{name}.{attr}`: vLLM {src.version}'s {name} has no {attr}")
    return out


def member_violations(use: AdapterUse, classes: Sequence[tuple[str, str]],
                      releases: Sequence[ReleaseSources], declared: Sequence[Declared],
                      compat_file: str = "vllm_compat.py") -> list[str]:
    """Attributes the adapter reads that some releases' classes have and others lack.

    Such an attribute must be declared, and read only in ``compat_file``.
    """
    known = {(d.owner, d.member) for d in declared}
    out = [f"{', '.join(sorted(use.attributes[d.member] - {compat_file}))} read(s) `.{d.member}`, "
           f"which differs between releases: only {compat_file} may"
           for d in declared if d.member in use.attributes and use.attributes[d.member] - {compat_file}
           and d.owner not in CONNECTOR_BASES]
    for module, name in classes:
        members = {src.version: class_members(src, module, name) for src in releases}
        for version, found in members.items():
            if not found:
                out.append(f"vLLM {version} has no class {name} in {module}")
        for attr in sorted(use.attributes):
            having = [v for v, found in members.items() if attr in found]
            if having and len(having) < len(releases) and (name, attr) not in known:
                lacking = [v for v in members if v not in having]
                out.append(f"the adapter reads `.{attr}`, which {name} has in vLLM "
                           f"{', '.join(having)} but not in {', '.join(lacking)}: handle it in "
                           "connector/vllm_compat.py and declare it in CHANGES")
    return out


def declared_violations(declared: Sequence[Declared], releases: Sequence[ReleaseSources]) -> list[str]:
    out = []
    for d in declared:
        for src in releases:
            if (d.member in class_members(src, d.module, d.owner)) != d.exists_in(src.version):
                out.append(f"CHANGES says {d.owner}.{d.member} was "
                           f"{'added' if d.added else 'removed'} in {d.release}, but vLLM "
                           f"{src.version} {'lacks' if d.exists_in(src.version) else 'has'} it")
    return out


def hook_violations(use: AdapterUse, releases: Sequence[ReleaseSources],
                    declared: Sequence[Declared]) -> list[str]:
    """The connector's methods against each release's connector base classes."""
    added = {d.member for d in declared if d.owner in CONNECTOR_BASES}
    out = []
    hooks = {src.version: _hooks(src) for src in releases}
    for name, fn in sorted(use.methods.items()):
        having = [v for v, h in hooks.items() if name in h]
        if not having:
            if not name.startswith("_"):
                out.append(f"{name}() is no connector hook in any tested vLLM (a misspelled "
                           "hook is never called)")
            continue
        if len(having) < len(releases) and name not in added:
            out.append(f"{name}() is a hook only in vLLM {', '.join(having)}: declare it in CHANGES")
        for version in having:
            theirs = _params(hooks[version][name])
            ours = _params(fn)
            keywords_taken = set(theirs[1]) <= set(ours[1]) or ours[2]
            if ours[0] != theirs[0] or (theirs[2] and not ours[2]) or not keywords_taken:
                out.append(f"{name}{ours} does not match vLLM {version}'s {name}{theirs}")
    for version, h in hooks.items():
        out += [f"vLLM {version}'s abstract {name}() is not implemented"
                for name, fn in sorted(h.items()) if _is_abstract(fn) and name not in use.methods]
    return out


def source_of(src: ReleaseSources, module: str, name: str) -> str | None:
    """The exact source text of a top-level function, class or constant."""
    tree = src.tree(module)
    text = src.source(module)
    for stmt in _top_level(tree.body if tree else []):
        if name in _bound_names(stmt) and not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            return ast.get_source_segment(text, stmt)
    return None


def _globals_read(table: symtable.SymbolTable) -> set[str]:
    names = {s.get_name() for s in table.get_symbols() if s.is_global()}
    for child in table.get_children():
        names |= _globals_read(child)
    return names


def release_function(src: ReleaseSources, module: str, name: str,
                     namespace: dict[str, Any] | None = None) -> Callable[..., Any]:
    """Function ``name`` of the release's ``module``, runnable beside the installed vLLM.

    Its globals are the installed module's, except the names it reads that the
    installed module lacks: those are the release's own, its functions of the same
    module (resolved the same way) or the module it imports them from (run whole,
    its imports resolving to the installed vLLM). So the release's own text of
    the function runs, on the installed release's objects.
    """
    if namespace is None:
        namespace = dict(vars(importlib.import_module(module)))
    text = source_of(src, module, name)
    assert text is not None, f"vLLM {src.version} has no {module}.{name}"
    namespace.setdefault(name, None)  # (read by itself, or by a helper it calls)
    for free in sorted(_globals_read(symtable.symtable(text, name, "exec"))
                       - set(namespace) - set(dir(builtins))):
        origin = _import_origin(src, module, free)
        if origin is None:  # a function of the same module
            release_function(src, module, free, namespace)
            continue
        helper = types.ModuleType(f"vllm_{src.version.replace('.', '_')}_{origin.replace('.', '_')}")
        exec(compile(src.source(origin), str(src.path_of(origin)), "exec"), helper.__dict__)
        namespace[free] = getattr(helper, free)
    exec(compile(text, f"{src.path_of(module)}:{name}", "exec"), namespace)
    return namespace[name]
