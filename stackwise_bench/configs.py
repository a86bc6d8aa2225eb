"""Where the config tree is: inside the installed package (a wheel), or next to it (a clone).

``conf/`` lives at the top of the repository (the design card) and is copied into the
wheel as ``stackwise_bench/conf`` (``pyproject.toml``: hatch ``force-include``), so
``pip install .`` or ``pip install git+<url>`` runs from any folder, and an editable
install keeps reading the clone's ``conf/`` as you edit it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def conf_dir() -> Path:
    """The config tree this installation uses: the packaged copy when there is one, else the clone's ``conf/``."""
    packaged = Path(str(files("stackwise_bench") / "conf"))
    if (packaged / "config.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "conf"


# Absolute, so it works whether an app runs as __main__ or is imported by a launcher's worker process.
CONF_DIR = str(conf_dir())
