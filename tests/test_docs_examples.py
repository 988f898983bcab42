"""Every code block a user would run in README.md and docs/*.md runs here, on tiny data:
Python blocks are executed, and the ``rmgl ...`` lines of shell blocks are run through
``rmgl.cli.main``. A block that needs what a test cannot have (a real dataset, a GPU, a
server, minutes of training) is preceded by ``<!-- not run: REASON -->``, and the reason is
required. Blocks of one page run in order in one sandbox folder (a copy of a shared one with
a tiny synthetic benchmark and a demo-shaped checkpoint), so a block may use what an earlier
block of its page wrote; each block is its own test case, named by page and line."""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
COMMAND = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*rmgl(\s|$)")  # VAR=x rmgl ...


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason, or None when the block runs

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def commands(self) -> list[list[str]]:
        """The ``rmgl`` command lines of a shell block (continuations joined, comments and
        leading VAR=value settings dropped), as argument lists without ``rmgl``."""
        found = []
        for line in self.text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if self.language == "console":  # only the lines after a prompt are commands
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not COMMAND.match(line):
                continue  # another program, a comment or output
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]
            found.append(words[1:])
        return found


def read_blocks(page: Path) -> list[Block]:
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(previous.strip())
        blocks.append(
            Block(page, start + 1, match.group(1), "\n".join(body) + "\n", marker and marker[1])
        )
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]
RUNNABLE = [b for b in BLOCKS if b.language == "python" or b.language in SHELLS]


def test_blocks_are_found_and_every_not_run_says_why():
    assert len([b for b in RUNNABLE if b.not_run is None]) >= 8
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.not_run.strip(), f"{block.name}: '<!-- not run: -->' needs a reason"


def test_the_small_config_in_the_guide_is_the_shipped_one():
    text = (REPO / "docs" / "own-data.md").read_text()
    shipped = (REPO / "rmgl" / "configs" / "small.yaml").read_text()
    assert f"```yaml\n{shipped}```" in text


@pytest.fixture(scope="session")
def base_sandbox(tmp_path_factory):
    """runs/demo/synthetic (a tiny benchmark), runs/demo/rmgl/best.safetensors (an untrained
    model of the demo's shape whose config reads that benchmark) and crops/a.jpg, b.jpg."""
    import torch

    from rmgl.data.synthetic import SynthConfig, generate
    from rmgl.engine.checkpoint import save_checkpoint
    from rmgl.engine.config import load_config, to_yaml
    from rmgl.model import build_model

    root = tmp_path_factory.mktemp("docs_sandbox")
    data = root / "runs" / "demo" / "synthetic"
    generate(
        SynthConfig(seed=2, train_ids=8, test_ids=6, distractors=4, junk=2),
        data,
        workers=1,
        progress=False,
    )
    cfg = load_config("demo", ["data.root=runs/demo/synthetic", "data.workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 8)
    save_checkpoint(
        root / "runs" / "demo" / "rmgl" / "best.safetensors",
        model,
        to_yaml(cfg),
        {"num_classes": 8},
    )
    (root / "crops").mkdir()
    images = sorted((data / "query").glob("*.jpg"))
    shutil.copy(images[0], root / "crops" / "a.jpg")
    shutil.copy(images[1], root / "crops" / "b.jpg")
    return root


@pytest.fixture(scope="session")
def page_sandboxes(base_sandbox, tmp_path_factory):
    """One sandbox per page, and the blocks of it that already ran."""
    made: dict[Path, tuple[Path, set[int]]] = {}

    def sandbox(page: Path) -> tuple[Path, set[int]]:
        if page not in made:
            folder = tmp_path_factory.mktemp(page.stem.replace(".", "_"))
            shutil.copytree(base_sandbox, folder, dirs_exist_ok=True)
            made[page] = (folder, set())
        return made[page]

    return sandbox


def run_block(block: Block) -> None:
    if block.language == "python":
        code = compile(block.text, block.name, "exec")
        exec(code, {"__name__": "__docs__"})
        return
    from rmgl.cli import main

    for argv in block.commands:
        with contextlib.redirect_stdout(None):
            code = main(argv)
        assert code == 0, f"{block.name}: rmgl {shlex.join(argv)} exited with {code}"


def keep_registries(monkeypatch) -> None:
    """Names an example registers (a dataset, a model, a loss, a store) vanish after it, so
    that other tests, in this process or in the same pytest-xdist worker, see the built-in
    registries."""
    from rmgl.data import datasets
    from rmgl.deploy import stores
    from rmgl.losses import registry as losses
    from rmgl.model import registry as models

    monkeypatch.setattr(datasets, "READERS", dict(datasets.READERS))
    monkeypatch.setattr(datasets, "_ALIASES", dict(datasets._ALIASES))
    monkeypatch.setattr(stores, "STORES", dict(stores.STORES))
    for registry in (models.MODELS, losses.LOSSES):
        monkeypatch.setattr(registry, "entries", dict(registry.entries))


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_docs_example(block: Block, page_sandboxes, monkeypatch, one_torch_thread):
    if block.not_run is not None:
        pytest.skip(f"not run: {block.not_run.strip()}")
    folder, ran = page_sandboxes(block.page)
    keep_registries(monkeypatch)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for earlier in RUNNABLE:  # what the page did before this block
        if earlier.page == block.page and earlier.line < block.line and earlier.not_run is None:
            if earlier.line not in ran:
                ran.add(earlier.line)
                run_block(earlier)
    if block.line not in ran:
        ran.add(block.line)
        run_block(block)


def test_shell_command_lines_are_read_as_a_user_types_them():
    block = Block(
        REPO / "README.md",
        1,
        "bash",
        "rmgl train demo \\\n    optim.epochs=2   # a comment\nOMP_NUM_THREADS=1 rmgl configs\n"
        "pip install rmgl\ntorchrun -m rmgl.cli train demo\n",
        None,
    )
    assert block.commands == [["train", "demo", "optim.epochs=2"], ["configs"]]
    console = Block(REPO / "README.md", 1, "console", "$ rmgl configs small\nrmgl output\n", None)
    assert console.commands == [["configs", "small"]]


def test_diagram_blocks_are_not_run():
    """The README's pipeline is a mermaid diagram: found as a block, never run."""
    diagrams = [b for b in BLOCKS if b.language == "mermaid"]
    assert [b.page.name for b in diagrams] == ["README.md"]
    assert not [b for b in diagrams if b in RUNNABLE]
    text = diagrams[0].text
    for step in ("rmgl train", "rmgl eval", "rmgl export", "rmgl index", "rmgl search"):
        assert step in text, step
