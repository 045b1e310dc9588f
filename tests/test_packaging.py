"""The Spack recipe's metadata stays in step with pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_spack_recipe_matches_pyproject() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    recipe = (ROOT / "packaging/spack/packages/py-dyadfs/package.py").read_text()
    assert f'version("{meta["version"]}"' in recipe
    py = re.search(r">=(\d+\.\d+)", meta["requires-python"]).group(1)  # type: ignore[union-attr]
    assert f'depends_on("python@{py}:"' in recipe
    for dep in meta["dependencies"]:
        name, low = re.match(r"([A-Za-z0-9_.-]+)>=([\d.]+)", dep).groups()  # type: ignore[union-attr]
        spack = "py-" + name.lower().replace("_", "-")
        assert f'depends_on("{spack}@{low}:"' in recipe or \
            f'depends_on("{spack}@{low.rstrip(".0")}:"' in recipe, f"{dep} missing in the recipe"
    assert 'depends_on("fuse@3:"' in recipe
    assert 'variant("flux"' in recipe and 'variant("ucx"' in recipe


def test_bench_c_sources_are_package_data() -> None:
    """`dyadfs bench --peer` compiles its C clients from the installed package: the wheel and
    the sdist must carry them."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]["dyadfs.bench"]
    sources = sorted((ROOT / "dyadfs/bench/c").iterdir())
    assert {p.name for p in sources} >= {"producer.c", "consumer.c", "clients.h"}
    for p in sources:
        assert any(p.relative_to(ROOT / "dyadfs/bench").match(g) for g in globs), p
