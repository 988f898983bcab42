"""rmgl as an installed package: every import declared, configs shipped, and a wheel that
runs the demo from a folder outside the checkout."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = (
        list(project["dependencies"])
        + list(extras["deploy"])
        + list(extras["ray"])
        + list(extras["serve"])
        + list(extras["track"])
        + list(extras["milvus"])
    )
    return {re.split(r"[<>=!~\[ ;]", n, maxsplit=1)[0].lower().replace("_", "-") for n in names}


def _imported_top_level() -> set[str]:
    found = set()
    for path in (REPO / "rmgl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"rmgl", "__future__"}


# Imported only to speak a user's own library's types when that library is installed (rmgl
# works without it): BoxMOT is AGPL and not an rmgl dependency (rmgl/deploy/trackers.py).
USERS_OWN = {"boxmot"}


def test_every_third_party_import_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module in sorted(_imported_top_level() - USERS_OWN):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (from {', '.join(sorted(dists))})")
    assert not missing, f"imported but not in pyproject dependencies: {missing}"


def test_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    """Build a wheel, install it (not editable) in a fresh virtual environment and run
    ``rmgl demo`` from a folder outside the checkout. The new environment borrows this one's
    third-party packages through a .pth file (torch alone is gigabytes) but not its rmgl."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("rmgl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without PYTHONPATH: a checkout on it would make pip think rmgl is installed already
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        env=env,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        return subprocess.run(
            [str(venv / "bin" / "rmgl"), *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = subprocess.run(
        [str(python), "-c", "import rmgl; print(rmgl.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site)), where
    page = subprocess.run(  # rmgl serve's web page is package data
        [str(python), "-c", "from importlib import resources; "
         "print(len(resources.files('rmgl.serve').joinpath('page.html').read_text()))"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert page.returncode == 0 and int(page.stdout) > 1000, page.stderr
    listing = run("configs")
    assert (
        listing.returncode == 0 and "market1501" in listing.stdout and "ablation/" in listing.stdout
    )
    demo = run(
        "demo", "--out", "demo", "--scale", "0.1", "optim.epochs=1", "data.workers=0",
        "data.height=48", "data.width=16",  # the demo's recipe at a quarter of its pixels
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "| RMGL (Local-2 + Local-3) | plain |" in demo.stdout
    assert "| multi-branch baseline (2+3, no RP/ABP/RSA) | plain |" in demo.stdout
    assert (elsewhere / "demo" / "demo_results.md").is_file()
    assert (elsewhere / "demo" / "rmgl" / "eval" / "ranked_list.png").is_file()
    report = elsewhere / "demo" / "rmgl" / "report.html"
    assert (
        report.is_file()
        and f"report of the RMGL run (open it in a browser): {Path('demo/rmgl/report.html')}"
        in demo.stdout
    )
