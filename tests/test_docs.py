"""The README and the documentation site stay true.

* Every ```python block of README.md and docs/**/*.md runs **as written**: each block alone,
  in a fresh namespace, with no set-up added (a reader pastes one block into a fresh
  interpreter). Blocks that are not meant to run use another fence label (```bash,
  ```text).
* The generated pages (results, benchmark tables, the README's results table) equal their
  rendering from the committed data (``python tools/render_results.py``).
* The README stays short, the user documents speak of the software (no development log),
  no file of the repository cites the external specification the methods were first
  written from, and every page of the site's navigation exists.
"""

import os
import re
import runpy
import subprocess

import pytest

from tests.helpers import ROOT

DOCS = os.path.join(ROOT, "docs")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
# the name of the external specification the methods were first written from, spelled
# so that this file does not contain it
EXTERNAL_NAME = "SP" + "EC"


def doc_files() -> list[str]:
    """README.md and every Markdown page under docs/, relative to the repository."""
    out = ["README.md"]
    for base, _, files in os.walk(DOCS):
        out += [os.path.relpath(os.path.join(base, f), ROOT) for f in files if f.endswith(".md")]
    return sorted(out)


def python_blocks() -> list[tuple[str, str]]:
    """``(file:line, code)`` of every top-level ```python block."""
    blocks = []
    for rel in doc_files():
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in FENCE.finditer(text):
            line = text[: m.start()].count("\n") + 1
            blocks.append((f"{rel}:{line}", m.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_pillar_examples_are_executed():
    """The README's examples and the how-to guides' are among the executed blocks."""
    where = {name.split(":")[0] for name, _ in BLOCKS}
    assert sum(name.startswith("README.md:") for name, _ in BLOCKS) >= 3
    for page in ("deq_in_jax", "attack_your_model", "certify_cpl"):
        assert f"docs/howto/{page}.md" in where, page


@pytest.mark.parametrize("name,code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs_as_written(name, code):
    namespace = {"__name__": "__docs__"}
    exec(compile(code, name, "exec"), namespace)


def test_no_indented_python_fences():
    """An indented ```python fence (inside a list or an admonition) would escape the
    runner above; keep executable blocks at the top level."""
    for rel in doc_files():
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        bad = re.findall(r"^[ \t]+```python", text, re.M)
        assert not bad, f"{rel}: indented ```python fence"
        assert not re.search(r"^```(py|python3|pycon)\s*$", text, re.M), (
            f"{rel}: use ```python (executed) or ```text (not executed)"
        )


def test_rendered_pages_are_up_to_date():
    render = runpy.run_path(os.path.join(ROOT, "tools", "render_results.py"))
    stale = render["stale"]()
    assert not stale, f"out of date with their data: {stale}; run `python tools/render_results.py`"


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        n = len(fh.read().splitlines())
    assert n <= 250, f"README.md has {n} lines; move reference material to docs/"


LOG_PHRASES = re.compile(
    r"this round|previous round|this session|previous session|in this session|issue #\d+|"
    r"\(#\d+\)",
    re.I,
)


def test_user_documents_speak_of_the_software():
    for rel in doc_files():
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        hits = sorted({m.group(0) for m in LOG_PHRASES.finditer(text)})
        hits += [EXTERNAL_NAME] if EXTERNAL_NAME in text else []
        assert not hits, f"{rel}: {hits}"


def _repository_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out if f and os.path.isfile(os.path.join(ROOT, f))]


def test_no_reference_to_the_external_specification():
    """Code, docstrings, tests and documents state what they mean or link to the
    documentation; nothing cites a file that is not in the repository."""
    found = []
    for rel in _repository_files():
        try:
            text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue  # binary files (images, parameters)
        lines = text.split("\n")
        found += [f"{rel}:{i + 1}" for i, line in enumerate(lines) if EXTERNAL_NAME in line]
    assert not found, found


def test_readme_links_exist():
    """The README is read on the code host, outside the site: its relative links point at
    files of the repository."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", fh.read())
    local = [link for link in links if "://" not in link]
    assert local and all(os.path.exists(os.path.join(ROOT, link)) for link in local), [
        link for link in local if not os.path.exists(os.path.join(ROOT, link))
    ]


def test_navigation_pages_exist():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as fh:
        config = yaml.safe_load(fh)

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    listed = list(pages(config["nav"]))
    assert listed and all(os.path.exists(os.path.join(DOCS, p)) for p in listed), [
        p for p in listed if not os.path.exists(os.path.join(DOCS, p))
    ]
