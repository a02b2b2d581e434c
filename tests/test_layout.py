"""The source root must never shadow the standard library's `platform` module (Ray and torch import it)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform, lm_lexicon; print(platform.system(), platform.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    system, path = out.split()
    assert system in ("Linux", "Darwin", "Windows")
    assert not path.startswith(str(REPO))


def test_every_job_script_opens_with_the_command_that_runs_it():
    for job in (REPO / "jobs").glob("*.py"):
        head = job.read_text().split('"""')[1]
        assert f"python jobs/{job.name}" in head, job.name


def test_the_readmes_layout_names_every_module_of_the_library_and_nothing_else():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    library_lines = layout.split("\nplatform/lm_lexicon/", 1)[1].split("\n", 1)[1].split("\njobs/", 1)[0]
    library = REPO / "platform" / "lm_lexicon"
    tree = {p.name + ("/" if p.is_dir() else "") for p in library.iterdir()
            if p.name not in ("__init__.py", "__pycache__")}
    named = {word for line in library_lines.splitlines() for word in line.split()
             if word.endswith((".py", "/"))}
    assert tree == named, f"missing from README: {sorted(tree - named)}; not in the tree: {sorted(named - tree)}"
