"""The module layers point one way: errors <- models <- sparse ops <- {data, export, engine} <- run <- apps.

Checked twice: statically (every import in fcmae/, deferred ones included, forms no cycle) and
by importing a module alone in a fresh interpreter and looking at what it pulled in.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fcmae"
APPS = {"fcmae.pretrain", "fcmae.finetune", "fcmae.export.exporter"}
PACKAGES = ("fcmae", "fcmae.models", "fcmae.sparse", "fcmae.data", "fcmae.engine", "fcmae.export", "fcmae.run",
            "fcmae.config", "fcmae.storage")
BACKENDS = {"fcmae.sparse.compact", "fcmae.sparse.masked_dense", "fcmae.sparse.minkowski"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the fcmae modules it imports anywhere in its source (relative imports resolved)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # the most specific fcmae module each import names ("from .x import y" may name a module y)
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "fcmae.sparse.me_kernels" in graph["fcmae.export.convert"]  # the parser sees relative imports
    # the package's __init__ files re-export their children; a child importing a sibling through
    # the package is not a cycle of the layers, so those edges are left out
    layered = {m: {t for t in ts if not (m.startswith(t + ".") and t in PACKAGES)}
               for m, ts in graph.items()}
    assert _cycle(layered) is None, " -> ".join(_cycle(layered))


# a second command of an app, in its own module (the app's module stays under 400 lines): its door, which
# nothing else imports
DOORS = {"fcmae.plan": "fcmae.pretrain"}  # fcmae-plan: pretraining's step, planned


def test_no_app_imports_another_app_and_lower_layers_import_no_app():
    graph = _import_graph()
    for module, targets in graph.items():
        # fcmae.export's __init__ (lazily) and __main__ are the app's own doors, not callers of it
        apps = {a for a in targets & APPS if not (module == a.rpartition(".")[0] or module == a.rpartition(".")[0] + ".__main__")
                and DOORS.get(module) != a}
        assert not apps, f"{module} imports the app(s) {apps}"
        assert not targets & set(DOORS), f"{module} imports the door(s) {targets & set(DOORS)}"


_IMPORT_ALONE = "import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('fcmae'))))"


ENGINE = {"fcmae.engine", "fcmae.run", "fcmae.storage.checkpoint", "fcmae.storage.checkpoint_store"}
ALONE = [
    ("fcmae.export.convert", BACKENDS | APPS | ENGINE),
    ("fcmae.engine", APPS | {"fcmae.visualize", "fcmae.data", "fcmae.export"}),
    ("fcmae.data", APPS | ENGINE | {"fcmae.export", "fcmae.evaluation", "fcmae.visualize"}),
    ("fcmae.finetune", {"fcmae.pretrain", "fcmae.export.exporter", "fcmae.visualize"}),
    ("fcmae.export.exporter", BACKENDS | {"fcmae.pretrain", "fcmae.finetune", "fcmae.engine", "fcmae.data"}),
]


@pytest.fixture(scope="module")
def pulled_in() -> dict[str, set[str]]:
    """What importing each module alone in a fresh interpreter pulls in; the interpreters run side by
    side (each spends seconds importing torch)."""
    procs = {module: subprocess.Popen([sys.executable, "-c", _IMPORT_ALONE.format(module=module)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module, _ in ALONE}
    out = {}
    for module, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        out[module] = set(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("module, must_not", ALONE)
def test_a_module_imported_alone_pulls_in_only_lower_layers(module, must_not, pulled_in):
    pulled = pulled_in[module]
    assert module in pulled
    assert not (pulled & must_not), f"importing {module} imported {sorted(pulled & must_not)}"


def _package(module: str) -> str:
    """The room a module lives in: its subpackage (``fcmae.data``), or the module itself on the top floor."""
    parts = module.split(".")
    return ".".join(parts[:2])


# room -> the rooms (or, dotted deeper, the modules) it must never import from (anywhere in its source,
# deferred imports included). storage/ is the bottom of the run layer: durable files, weight files, the
# lock, and the checkpoints of a run directory, which the model, data and config rooms never touch.
_RUN_CHECKPOINTS = {"fcmae.storage.checkpoint", "fcmae.storage.checkpoint_store", "fcmae.storage.checkpoint_write"}
FORBIDDEN = {
    "fcmae.models": {"fcmae.data", "fcmae.export", "fcmae.engine", "fcmae.run", "fcmae.storage.checkpoint",
                     "fcmae.pretrain", "fcmae.finetune", "fcmae.config"},
    "fcmae.sparse": {"fcmae.data", "fcmae.export", "fcmae.engine", "fcmae.run", "fcmae.storage.checkpoint",
                     "fcmae.pretrain", "fcmae.finetune", "fcmae.config"},
    "fcmae.data": {"fcmae.engine", "fcmae.run", "fcmae.storage.checkpoint", "fcmae.export", "fcmae.evaluation",
                   "fcmae.pretrain", "fcmae.finetune"},
    "fcmae.export": {"fcmae.data", "fcmae.engine", "fcmae.run", "fcmae.pretrain", "fcmae.finetune"},
    "fcmae.engine": {"fcmae.data", "fcmae.export", "fcmae.run", "fcmae.evaluation", "fcmae.visualize",
                     "fcmae.pretrain", "fcmae.finetune"},
    # configs check their own values; values other rooms own are checked there (#39)
    "fcmae.config": {"fcmae.data", "fcmae.engine", "fcmae.export", "fcmae.run", "fcmae.storage.checkpoint",
                     "fcmae.pretrain", "fcmae.finetune", "fcmae.evaluation", "fcmae.loggers"},
    # the run assembles what the apps hand it; it reads initial weights through the converter (a library
    # of fcmae.export), never through the exporter app
    "fcmae.run": {"fcmae.pretrain", "fcmae.finetune"},
    "fcmae.storage": {"fcmae.models", "fcmae.sparse", "fcmae.data", "fcmae.export", "fcmae.engine", "fcmae.run",
                      "fcmae.config", "fcmae.pretrain", "fcmae.finetune", "fcmae.evaluation", "fcmae.loggers"},
}
for room in ("fcmae.models", "fcmae.sparse", "fcmae.data", "fcmae.config"):
    FORBIDDEN[room] = (FORBIDDEN[room] - {"fcmae.storage.checkpoint"}) | _RUN_CHECKPOINTS


def _forbidden(module: str, target: str) -> bool:
    rules = FORBIDDEN.get(_package(module), ())
    return _package(target) in rules or target in rules


def test_the_package_arrows_point_one_way():
    """models <- sparse; data; export; engine <- runner <- apps: no room imports from a room above it."""
    graph = _import_graph()
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if _forbidden(m, t))
    assert not wrong, "imports against the arrows:\n  " + "\n  ".join(wrong)
    # and the rooms exist as packages (a module moved back to the top floor would make this vacuous)
    assert {"fcmae.data.sources", "fcmae.data.loaders", "fcmae.engine.loop", "fcmae.export.convert",
            "fcmae.run.assembly"} <= set(graph)
    assert not [t for m, ts in graph.items() if _package(m) == "fcmae.run" for t in ts if t == "fcmae.export.exporter"]


def test_every_user_error_derives_from_one_base_and_comes_back_whole_on_another_rank():
    """One base class instead of hand-kept lists (#39): before, a NonFiniteLoss or DataQualityError
    raised in a rank-0 decision came back on the other ranks as a CheckpointError, and a
    BandCountError (two constructor arguments) could not be raised there at all."""
    from fcmae.config import ConfigError
    from fcmae.data.image_io import BandCountError, DataError
    from fcmae.engine import DataQualityError, NonFiniteLoss
    from fcmae.errors import UserError, user_error
    from fcmae.storage.files import DiskWriteError
    from fcmae.storage.run_lock import RunDirectoryBusy
    from fcmae.storage.weights_file import CheckpointError
    for cls in (ConfigError, DataError, BandCountError, DataQualityError, NonFiniteLoss, DiskWriteError,
                RunDirectoryBusy, CheckpointError):
        assert issubclass(cls, UserError), cls
        again = user_error(cls.__name__, "the message and its fix")
        assert type(again) is cls and str(again) == "the message and its fix"
    assert type(user_error("NoSuchError", "text")) is UserError


def test_old_import_paths_keep_working():
    """What user code may hold from before the layout: the converter's old module, the package's
    model factory, ``fcmae.export.export``."""
    import fcmae
    import fcmae.convert
    import fcmae.export
    from fcmae.export import convert, exporter
    assert fcmae.convert.to_dense is convert.to_dense
    assert fcmae.convert.CheckpointError is convert.CheckpointError
    assert fcmae.export.export is exporter.export and fcmae.export.main is exporter.main
    assert callable(fcmae.create_fcmae)


def test_the_architecture_map_names_every_module():
    """docs/architecture.md is the map a reader finds things by: a module it does not name is one a
    reader cannot find from it."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    unnamed = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and p.name not in text]
    assert not unnamed, f"docs/architecture.md does not name {unnamed}"


def test_the_top_floor_is_a_few_modules_and_no_module_is_long():
    """#39: a reader finds the rooms from the top floor (at most 10 modules beside the packages) and no
    module holds more than 400 lines."""
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 10, top
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
