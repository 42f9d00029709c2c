"""Only the dependencies: the pins of requirements.txt and requirements-embedded.txt.

pyproject.toml holds everything else. setuptools' ``file:`` reader would take these files
too, but rejects the inline comments they carry, hence this reader.

Two installs from the one list of pins:

* ``pip install mlsli`` (from a clone ``pip install .``): the base, what ``Client.remote``
  needs to write over HTTP, i.e. requests alone;
* ``pip install "mlsli[server]"`` (``pip install ".[server]"``): the server, the loader, the
  demo and ``Client.local``: every pin of both files.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CLIENT = ("requests",)  # what datasource.client imports for Client.remote


def pins(name: str) -> list[str]:
    """Requirement lines of a requirements file, comments and pip options dropped."""
    lines = (line.split("#", 1)[0].strip() for line in (HERE / name).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def project(requirement: str) -> str:
    """The normalized project name of a requirement line (``Foo_Bar==1`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]).lower()


SERVER = pins("requirements.txt") + pins("requirements-embedded.txt")
BASE = [r for r in SERVER if project(r) in CLIENT]
assert len(BASE) == len(CLIENT), f"requirements.txt lacks a pin of {CLIENT}"

setup(install_requires=BASE, extras_require={"server": SERVER})
# `pip install ".[server]"` builds the package with setuptools; `mlsli --help` lists the commands.
