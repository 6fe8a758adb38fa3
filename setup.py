"""Ships the data folders (configs/, quantized/, templates/, seeds/, tasks/) inside the package.

They stay at the top of the repository, where users edit them; the build copies them into
ensemble_instruct/_data, which `config.ROOT` points at when the package runs from an install.
Everything else is in pyproject.toml.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = {"configs": "*.toml", "quantized": "*.toml", "templates": "*", "seeds": "*.jsonl", "tasks": "*.jsonl"}


class build_py_with_data(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for folder, pattern in DATA.items():
            target = Path(self.build_lib) / "ensemble_instruct" / "_data" / folder
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted((here / folder).glob(pattern)):
                shutil.copy2(f, target / f.name)


setup(cmdclass={"build_py": build_py_with_data})
