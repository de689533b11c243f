"""The package as installed: top-level exports, a light `arelbo --help`, extras named when missing, one version."""

import subprocess
import sys
from pathlib import Path

import pytest

import arelbo

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_top_level_exports_are_the_library_objects():
    from arelbo.config import RunConfig
    from arelbo.metrics import ELBOAccumulator
    from arelbo.objectives import POLICIES, GaussianVAELoss, register_policy
    from arelbo.runs import load_model

    assert arelbo.GaussianVAELoss is GaussianVAELoss and arelbo.register_policy is register_policy
    assert arelbo.POLICIES is POLICIES and arelbo.ELBOAccumulator is ELBOAccumulator
    assert arelbo.RunConfig is RunConfig and arelbo.load_model is load_model
    for name in arelbo.__all__:
        assert getattr(arelbo, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        arelbo.nope  # noqa: B018
    assert (ROOT / "src" / "arelbo" / "py.typed").is_file()


def test_import_and_help_do_not_import_torch_or_any_command():
    res = python("import sys, arelbo, arelbo.cli\n"
                 "try:\n    arelbo.cli.main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
                 "print(code, sorted(m for m in sys.modules if m in ('torch', 'arelbo.train', 'arelbo.study',"
                 " 'arelbo.evaluate', 'lightning', 'matplotlib')))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 []"
    assert "compare" in res.stdout and "train" in res.stdout  # every command is listed


@pytest.mark.parametrize("module, extra, argv", [
    ("lightning", "train", ["train", "--preset", "linear-gaussian", "--out", "{tmp}/run"]),
    ("sklearn", "eval", ["linear", "--eigenvalues", "3,2,1", "--latent-dim", "1", "--fixed-sigma2", "1",
                         "--mc-steps", "0", "--steps", "2", "--n", "50"]),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, module, extra, argv):
    """A command that needs an extra that is not installed says which, exit code 2, no traceback."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    res = python(f"import sys; sys.modules[{module!r}] = None\n"  # as if it were not installed
                 f"from arelbo.cli import main\nsys.exit(main({args!r}))")
    assert res.returncode == 2, res.stderr
    assert f"pip install 'arelbo[{extra}]'" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"arelbo {argv[0]}: error: this command needs")


def test_the_version_is_written_once():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]
    assert 'version = { attr = "arelbo.__version__" }' in text
    res = python("import arelbo.cli; arelbo.cli.main(['--version'])")
    assert res.stdout.strip() == f"arelbo {arelbo.__version__}"


CORE = ["objectives", "linear.py", "linear_hierarchy.py", "registry.py", "fileio.py", "models", "metrics"]
PIPELINE = {"train", "cli", "study", "report", "runs", "data", "config", "schema", "evaluate", "evalconfig", "demo", "grids",
            "samplers", "imagegrid", "stats"}


def test_the_core_imports_nothing_from_the_pipeline():
    """objectives, models, metrics and linear (pure PyTorch) never import the training/evaluation pipeline."""
    import ast

    src = ROOT / "src" / "arelbo"
    files = [p for entry in CORE for p in ((src / entry).rglob("*.py") if (src / entry).is_dir() else [src / entry])]
    assert len(files) >= 8
    offending = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "arelbo" and len(parts) > 1 and parts[1] in PIPELINE:
                    offending.append(f"{path.relative_to(src)}: {name}")
    assert offending == []


def _arelbo_imports(path: Path) -> set[str]:
    """The arelbo modules a file imports at run time (at any depth; blocks under ``if TYPE_CHECKING:`` are not run)."""
    import ast

    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("arelbo")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("arelbo"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_import_circles_between_the_packages_modules():
    """Data flow one way (data -> model -> objective -> trainer -> run -> evaluation -> study -> report): no two
    top-level modules or packages of arelbo import each other, directly or through others."""
    src = ROOT / "src" / "arelbo"
    top = {p.stem if p.is_file() else p.name for p in src.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {name: set() for name in top}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).parts
        if parts == ("__init__.py",):
            continue  # the package face: lazy look-ups only
        here = parts[0].removesuffix(".py")
        for name in _arelbo_imports(path):
            target = name.split(".")[1] if "." in name else None
            if target in graph and target != here:
                graph[here].add(target)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reaches(b)})
    assert circles == []


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "src").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_package_faces_list_public_names_only():
    """Every package's ``__all__`` names public objects that exist; internals are imported from their own modules."""
    import importlib

    src = ROOT / "src" / "arelbo"
    faces = ["arelbo"] + [f"arelbo.{p.parent.relative_to(src).as_posix().replace('/', '.')}"
                          for p in src.rglob("__init__.py") if p.parent != src]
    assert len(faces) >= 10
    for name in faces:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported, f"{name} has no __all__"
        assert [n for n in exported if n.startswith("_") and n != "__version__"] == [], name
        assert [n for n in exported if not hasattr(module, n)] == [], name
        # no private name of another module re-exported through the face
        borrowed = [n for n, v in vars(module).items() if n.startswith("_") and not n.startswith("__")
                    and callable(v) and getattr(v, "__module__", name) != name]
        assert borrowed == [], f"{name} re-exports private names {borrowed}"
