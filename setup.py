"""Build glue that pyproject.toml cannot express.

Three source folders map onto one import name (``plugin/`` → ``histosynth``,
``synthesis/`` → ``histosynth.synthesis``, ``integration/`` → ``histosynth.integration``),
and the manifest ``plugin.yaml`` lives at the top of the checkout but must ship inside
the package so that ``histosynth.manifest`` finds it in a wheel install.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
FOLDERS = {
    "histosynth": "plugin",
    "histosynth.synthesis": "synthesis",
    "histosynth.integration": "integration",
}


def _packages() -> list[str]:
    names = []
    for package, folder in FOLDERS.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(folder)]
    return sorted(set(names))


class BuildWithManifest(build_py):
    """Copy ``plugin.yaml`` into the built ``histosynth`` package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "histosynth" / "plugin.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(ROOT / "plugin.yaml"), str(target))


setup(
    package_dir=FOLDERS,
    packages=_packages(),
    package_data={
        "histosynth": ["qupath/*.groovy", "review/*.html"],
        # the embedded default engine (preset "default"): weights, configs, model card
        "histosynth.synthesis": [
            "embedded/*/*.json",
            "embedded/*/*.md",
            "embedded/*/*.jpg",
            "embedded/*/*.png",
            "embedded/*/*/*.json",
            "embedded/*/*/*.safetensors",
        ],
    },
    cmdclass={"build_py": BuildWithManifest},
)
