"""Install the project's dependencies (not the project itself) into the current interpreter.

The venv is cached outside the checkout and shared by every clone, so the project is put on PYTHONPATH instead of
being installed: an editable install would pin the venv to whichever clone installed it last.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
deps = list(project["dependencies"])
for extra in sys.argv[1:] or ["engine", "operator", "dev"]:
    deps += project["optional-dependencies"][extra]
subprocess.run([sys.executable, "-m", "pip", "install", "-q", *deps], check=True)
