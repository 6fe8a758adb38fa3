"""The package as a user installs it: a wheel built from the repository, used from another folder."""
import os
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of the tracked files (no build isolation: no network, the current setuptools)."""
    import setuptools  # in the dev extra: a missing or old one fails here

    # pyproject's license = "..." (PEP 639) needs setuptools >= 77
    assert int(setuptools.__version__.split(".")[0]) >= 77, f"setuptools {setuptools.__version__} < 77"
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(tmp.glob("ensemble_instruct-*.whl"))


def test_wheel_ships_configs_cards_templates_seeds_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("configs", "*.toml"), ("quantized", "*.toml"), ("templates", "*.txt"), ("seeds", "*.jsonl"),
                            ("tasks", "*.jsonl")):
        expected = {f"ensemble_instruct/_data/{folder}/{p.name}" for p in (ROOT / folder).glob(pattern)}
        assert expected and expected <= names, folder
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "ensemble-instruct = ensemble_instruct.cli:main" in entry


def test_installed_package_generates_from_another_folder(wheel, tmp_path):
    """Unpacked as pip installs it; run from a folder that has none of the repository's files, with a
    config that names only a bundled seed file and templates (fake models: no model extras needed)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    (work / "cards").mkdir(parents=True)
    (work / "cards" / "w.gguf").write_bytes(b"GGUF" + bytes(4096))
    for name in ("gen", "x1", "x2"):
        (work / "cards" / f"{name}.toml").write_text(f'name = "{name}"\nbackend = "llama_cpp"\n[source]\npath = "w.gguf"\n')
    (work / "my.toml").write_text('generator = "cards/gen.toml"\nextra = ["cards/x1.toml", "cards/x2.toml"]\n'
                                  "[instructions]\ntarget = { A = 2, B = 1 }\n")
    code = ("import sys; sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]\n"
            "import ensemble_instruct; assert ensemble_instruct.__file__.startswith(sys.path[0]), ensemble_instruct.__file__\n"
            "import fakes; fakes.install()\n"
            "from ensemble_instruct.cli import main; sys.argv[0] = 'ensemble-instruct'; main()")
    run = lambda *args: subprocess.run([sys.executable, "-c", code, str(site), str(ROOT / "tests"), *args],  # noqa: E731
                                       cwd=work, capture_output=True, text=True, timeout=300,
                                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    r = run("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout, r.stderr[-2000:]
    r = run("generate", "-c", "my.toml", "--out", "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "out" / "dataset.jsonl").read_text().count("\n") >= 1


def test_readme_links_stay_inside_the_repository():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text) + re.findall(r"<(https?://[^>]+)>", text)
    outside = [t for t in targets if re.match(r"[a-z]+:", t) or t.startswith(("/", "..")) or not (ROOT / t.split("#")[0]).exists()]
    assert outside == []
    assert "../shared" not in text


def test_declared_minimum_versions():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"transformers>=4.56"' in text  # hf backend: from_pretrained(dtype=...)


def test_no_test_hooks_in_the_package():
    for path in (ROOT / "ensemble_instruct").rglob("*.py"):
        text = path.read_text()
        assert "KILL_AT" not in text and "_crash_here" not in text and "SIGKILL" not in text, path
