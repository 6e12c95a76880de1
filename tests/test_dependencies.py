"""Dependencies are declared exactly as imported: every third-party import of emajax/ is a runtime dependency
and every runtime dependency is imported (an optional feature's imports live in its extra, FEATURE_EXTRAS); bench/ and tests/ likewise with their extras (`bench`, `test`).
A new import without its declaration (or a declaration nothing imports) fails here. Run as a script to print
the comparison: `python tests/test_dependencies.py`."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution, for packages that may be absent here (installed ones are looked up)
KNOWN = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "sklearn": "scikit-learn", "PIL": "pillow"}
# extras that are variants of a runtime dependency, not imports of their own
VARIANT_EXTRAS = ("cuda", "tpu")
# extras that are optional features of emajax: imported by emajax (lazily, with a clear error when absent),
# not runtime dependencies; the test extra carries them too so that the features' tests run
FEATURE_EXTRAS = ("tfds",)
# runtime dependencies declared without an import of ours, each with its reason
NOT_IMPORTED = {
    "jinja2": "transformers renders chat templates with it but does not require it",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"runtime": {_requirement_name(r) for r in project["dependencies"]}}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra not in VARIANT_EXTRAS:
            out[extra] = {_requirement_name(r) for r in reqs}
    return out


def imported(root: str) -> dict[str, str]:
    """{distribution: first file importing it} for the third-party imports of the .py files under ``root``."""
    local = {"emajax", "bench", "tests", "__future__"} | {p.stem for p in (REPO / root).glob("*.py")}
    dists = importlib.metadata.packages_distributions()
    out: dict[str, str] = {}
    for path in sorted((REPO / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                dist = KNOWN.get(top) or next(iter(sorted(dists.get(top, []))), top)
                out.setdefault(_norm(dist), str(path.relative_to(REPO)))
    return out


def check() -> list[str]:
    dec = declared()
    runtime = imported("emajax")
    features = set().union(*(dec.get(e, set()) for e in FEATURE_EXTRAS))
    problems = [f"{d} is imported ({f}) but not a runtime dependency (nor in a feature extra {FEATURE_EXTRAS})"
                for d, f in runtime.items() if d not in dec["runtime"] | features]
    problems += [f"{d} is in a feature extra but emajax never imports it" for d in sorted(features - set(runtime))]
    problems += [f"{d} is a runtime dependency that emajax never imports (if it is needed, say why in NOT_IMPORTED)"
                 for d in sorted(dec["runtime"] - set(runtime) - set(NOT_IMPORTED))]
    bench, tests = imported("bench"), imported("tests")
    feature_use = {d: f for d, f in runtime.items() if d in features}
    # the tests run bench too, and every feature
    for extra, used, also in (("bench", bench, {}), ("test", tests, {**bench, **feature_use})):
        need = {d: f for d, f in {**also, **used}.items() if d not in dec["runtime"]}
        problems += [f"{d} is imported ({f}) but not in the {extra!r} extra" for d, f in need.items()
                     if d not in dec.get(extra, set())]
        problems += [f"{d} is in the {extra!r} extra but never imported there" for d in
                     sorted(dec.get(extra, set()) - set(need))]
    return problems


def test_dependencies_are_declared_exactly_as_imported():
    problems = check()
    assert not problems, "pyproject.toml and the imports disagree:\n" + "\n".join(problems)


if __name__ == "__main__":
    print("\n".join(check()) or "pyproject.toml declares exactly what emajax, bench and tests import")
