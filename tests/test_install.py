"""A wheel install is complete: presets, images and class names ship inside the package."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_non_editable_install_finds_its_presets_from_any_directory(tmp_path: Path) -> None:
    """Install the project (not editable) into a fresh venv that borrows this one's dependencies,
    then list presets and load one from a directory outside the checkout."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, typer, ...) come from this environment, not from the network
    Path(target, "borrowed.pth").write_text("\n".join(p for p in site.getsitepackages() if "site-packages" in p) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", target, str(ROOT)], check=True, capture_output=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listed = subprocess.run([python, "-m", "transinv", "presets"], cwd=outside, capture_output=True, text=True,
                            env={**env, "COLUMNS": "200"}, timeout=120)
    assert listed.returncode == 0, listed.stderr
    shipped = sorted(p.stem for p in (ROOT / "transinv" / "configs").glob("*.yaml"))
    assert shipped and all(name in listed.stdout for name in shipped)
    where = subprocess.run(
        [python, "-c", "import transinv, transinv.presets as p; print(transinv.__file__); "
                       "print(p.load_preset('zhang2019-consistency')['consistency'])"],
        cwd=outside, capture_output=True, text=True, env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    installed, consistency = where.stdout.split()
    assert not installed.startswith(str(ROOT)), "the checkout was imported instead of the installed package"
    assert consistency
