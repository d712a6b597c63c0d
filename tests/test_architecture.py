"""docs/architecture.md against the code: the import rule between stages, every `gradproj.`
name the page writes exists, one meaning per public name, and the size of a module."""

import ast
import importlib
import re
from collections import defaultdict

from tests.conftest import REPO

PAGE = (REPO / "docs" / "architecture.md").read_text()
FRONT_ENDS = {"cli", "extract", "plan", "query", "__main__"}
MAX_MODULE_LINES = 600  # a module longer than this holds more than one concern: split it
# Public names that two modules define on purpose, each with its reason; a name defined twice
# otherwise means either one thing written twice or two things under one name.
SHARED_NAMES: dict[str, str] = {}


def stages() -> list[str]:
    (line,) = [x for x in PAGE.splitlines() if x.startswith("Stages: ")]
    return line.removeprefix("Stages: ").split(" -> ")


def gradproj_imports(path) -> set[str]:
    """The gradproj modules a file imports, anywhere in it, as their first component."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradproj"):
            parts = node.module.split(".")
            names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gradproj.")}
    return names


def stage_of(path) -> str:
    """A module's stage: its own name, or its package's for a module of a subpackage."""
    return path.stem if path.parent.name == "gradproj" else path.parent.name


def test_a_stage_imports_only_stages_to_its_left():
    order = stages()
    package = REPO / "gradproj"
    modules = [*package.glob("*.py"), *package.glob("*/*.py")]
    assert set(order) <= {stage_of(p) for p in modules}
    for path in modules:
        stage = stage_of(path)
        if stage in FRONT_ENDS or stage in ("errors", "__init__"):
            continue
        assert stage in order, f"{path.name} is neither a stage nor a front end in the page"
        allowed = set(order[: order.index(stage) + 1]) | {"errors", "__version__"}
        wrong = gradproj_imports(path) - allowed
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_every_gradproj_name_on_the_page_exists():
    names = set(re.findall(r"`(gradproj(?:\.\w+)+)", PAGE))
    assert len(names) > 10
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[cut:]:
            assert hasattr(obj, attribute), name
            obj = getattr(obj, attribute)


def stage_modules(stage: str) -> list:
    """The files of a stage: its module, or every module of its package."""
    module = REPO / "gradproj" / f"{stage}.py"
    paths = [module] if module.exists() else sorted((REPO / "gradproj" / stage).glob("*.py"))
    assert paths, f"no stage {stage}"
    return paths


def test_the_analysis_reads_the_ground_truth_without_the_trainer():
    for path in stage_modules("analysis"):
        assert "retrain" not in gradproj_imports(path), path.name


def test_scoring_reads_stored_vectors_only():
    """The model is read by extraction alone (kfac's factor pass included): the scoring stages
    never load a model or run its gradients."""
    for stage in ("curvature", "scoredir", "influence"):
        for path in stage_modules(stage):
            wrong = gradproj_imports(path) & {"models", "gradients", "targets"}
            assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def package_modules() -> list:
    """Every module of gradproj, at any depth."""
    return sorted((REPO / "gradproj").rglob("*.py"))


def test_no_two_modules_define_the_same_public_name():
    """A public top-level function or class name has one definition in gradproj."""
    defined = defaultdict(list)
    for path in package_modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if not node.name.startswith("_"):
                    defined[node.name].append(str(path.relative_to(REPO)))
    twice = {name: paths for name, paths in defined.items() if len(paths) > 1}
    assert twice.keys() == SHARED_NAMES.keys(), twice  # an entry no longer needed goes too


def test_every_module_is_at_most_600_lines():
    for path in package_modules():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines"
