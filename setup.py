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


EMBEDDED = ROOT / "synthesis" / "embedded"
"""Engine folders shipped as package data (the ``default`` preset's weights)."""


def _embedded_packages() -> dict[str, list[str]]:
    """Every folder under ``synthesis/embedded`` as a data-only package → its file patterns."""
    out = {}
    for folder in [EMBEDDED, *sorted(p for p in EMBEDDED.rglob("*") if p.is_dir())]:
        relative = folder.relative_to(ROOT / "synthesis").parts
        out[".".join(("histosynth.synthesis", *relative))] = ["*.json", "*.md", "*.jpg", "*.png",
                                                              "*.safetensors"]
    return out


def _packages() -> list[str]:
    names = []
    for package, folder in FOLDERS.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(folder)]
    names += list(_embedded_packages())
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
        **_embedded_packages(),
    },
    cmdclass={"build_py": BuildWithManifest},
)
