"""Only the dependencies: the pins of requirements.txt and requirements-embedded.txt.

pyproject.toml holds everything else. setuptools' ``file:`` reader would take these files
too, but rejects the inline comments they carry, hence this reader.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def pins(name: str) -> list[str]:
    """Requirement lines of a requirements file, comments and pip options dropped."""
    lines = (line.split("#", 1)[0].strip() for line in (HERE / name).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


setup(install_requires=pins("requirements.txt") + pins("requirements-embedded.txt"))
