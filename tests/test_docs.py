"""The docs run: every fenced block marked `<!-- run -->` in README.md and docs/*.md runs, in order, page by page, in
a fresh folder (bash blocks with the venv's `nanoqwen` on the PATH, Python blocks in this interpreter), and every
relative link points to a file that exists. Blocks that need a GPU, a download or a long run are left unmarked."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
BLOCK = re.compile(r"^<!-- run -->\n```(bash|python)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def runnable_blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall(open(os.path.join(ROOT, page), encoding="utf-8").read())


def test_pages_are_short_where_a_newcomer_starts():
    assert len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()) <= 250
    assert runnable_blocks("README.md"), "the README has no runnable example"


@pytest.mark.parametrize("page", PAGES)
def test_links_point_to_files_that_exist(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target, _ in LINK.findall(text):
        if "://" in target:
            continue
        path = os.path.normpath(os.path.join(folder, target))
        assert path.startswith(ROOT + os.sep), f"{page}: link {target} leaves the repository"
        assert os.path.exists(path), f"{page}: link {target} points to nothing"


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)])
def test_runnable_blocks_run(page, tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for kind, code in runnable_blocks(page):
        command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page}: this block failed:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
