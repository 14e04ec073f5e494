"""The project is described in pyproject.toml; this file only adds the repository's configs/ to the wheel
(as ernie_lora/configs/), so that an installed studio offers the same presets as a clone."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the clone's configs/ directly
            return
        target = Path(self.build_lib) / "ernie_lora" / "configs"
        self.mkpath(str(target))
        for path in sorted(CONFIGS.glob("*.yaml")):
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildWithConfigs})
