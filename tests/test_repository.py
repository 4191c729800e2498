"""The repository's shape: imports run one way, the model is only the network, the README is short and its links
resolve, and `.ci/run` runs the README's test command."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resnet_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each resnet_jax module -> the resnet_jax modules it imports anywhere in its body (function-level imports
    included); `from package import name` counts as importing the submodule `name` where one exists."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                imported |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_resnet_jax_has_no_import_cycle():
    graph = import_graph()
    assert "resnet_jax.weights.formats" in graph and graph["resnet_jax.restore"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_weights_import_downward_only():
    graph = import_graph()
    assert not graph["resnet_jax.weights.formats"] & {m for m in graph if m.startswith("resnet_jax")}
    assert "resnet_jax.weights.files" not in graph["resnet_jax.weights.convert"]
    assert not any(m.startswith(("resnet_jax.restore", "resnet_jax.export", "resnet_jax.checkpoint"))
                   for m in graph["resnet_jax.weights.files"] | graph["resnet_jax.weights.convert"])


def test_the_model_package_is_only_the_network():
    for path in (PACKAGE / "models").rglob("*.py"):
        text = path.read_text()
        for word in ("platform_dependent", "compiler_options", "conv_impl", "custom_vjp", "xla_cpu"):
            assert word not in text, f"{path.name} mentions {word}"


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_is_a_short_guide():
    assert len(readme().splitlines()) <= 250


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))])
def test_every_link_resolves(doc):
    path = ROOT / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local or doc != "README.md"
    for link in local:
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        assert resolved.exists(), f"{doc}: {link}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{doc}: {link} (headings: {sorted(slugs)})"


def test_ci_runs_the_readmes_test_command():
    commands = re.findall(r"^python -m pytest.*$", readme(), re.M)
    assert commands == ["python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python -m pytest$", ci, re.M) and "set -euo pipefail" in ci


def test_no_comment_cites_an_issue_number():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "experiments").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                 ROOT / "launch.py"]:
        assert not re.search(r"\b[Ii]ssue \d+", path.read_text()), path
