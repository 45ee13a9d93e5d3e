"""What a user installs is a wheel, not this checkout (issue 47, item 7): a hand-written package list in
pyproject.toml once left ``fcmae.run``, ``fcmae.config`` and ``fcmae.storage`` out of it, and every test,
installing editable, passed. Here the wheel is built from the source tree and compared with it; the full
set installs it non-editable in a fresh virtual environment and runs the apps from an unrelated folder."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built offline (the dev extra brings setuptools and wheel)."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    # a copy of the tree: building in place would leave build/ and *.egg-info in the checkout
    src = build / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file() and not name.startswith(("tests/", "docs/", "benchmarks/")):
            dest = src / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes((ROOT / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                           str(src)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (found,) = out.glob("fcmae-*.whl")
    return found


def source_modules() -> set[str]:
    """Every module of the source tree as the wheel must hold it (conf/ ships as fcmae/conf/)."""
    out = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fcmae").rglob("*.py") if "__pycache__" not in p.parts}
    out |= {"fcmae/conf/" + p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*")
            if p.suffix in (".py", ".yaml")}
    return out


def test_the_wheel_holds_every_module_and_config_of_the_source_tree(wheel):
    with zipfile.ZipFile(wheel) as z:
        held = {n for n in z.namelist() if n.startswith("fcmae/")}
    missing = sorted(source_modules() - held)
    assert not missing, f"the wheel lacks {missing}"
    assert {"fcmae/run/resume.py", "fcmae/config/schemas.py", "fcmae/storage/checkpoint.py",
            "fcmae/conf/pretrain.yaml", "fcmae/conf/model/convnextv2_atto.yaml"} <= held
    assert not sorted(n for n in held if n.endswith(".py") and n not in source_modules()), "stale files in the wheel"


@pytest.mark.slow
def test_a_non_editable_install_runs_the_apps_from_an_unrelated_folder(wheel, tmp_path):
    """A fresh venv holding the wheel, with this environment's dependencies on its path (a ``.pth``: their
    own ``.pth`` files, the editable install's among them, are not run, so ``fcmae`` is the wheel's)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "parent_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "--quiet", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", WANDB_MODE="disabled")
    where = subprocess.run([str(py), "-c", "import fcmae, fcmae.config.schemas as s; print(fcmae.__file__); "
                            "print(s.CONFIG_PATH)"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-2000:]
    module, config_path = where.stdout.split()
    assert Path(module).is_relative_to(site), f"fcmae came from {module}, not the installed wheel"
    assert config_path == "pkg://fcmae.conf"
    demo = subprocess.run([str(venv / "bin" / "fcmae-pretrain"), "trainer.max_steps=2", "data.img_size=64",
                           "data.num_workers=0", "data.synthetic_images=32", "data.batch_size=8",
                           "trainer.vis_every=1000"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    (run_dir,) = [p.parent.parent for p in elsewhere.glob("outputs/**/checkpoints/last.pt")]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*.pt")) == ["checkpoint-0000002.pt"]
    out = elsewhere / "atto.safetensors"
    export = subprocess.run([str(venv / "bin" / "fcmae-export"), str(run_dir.relative_to(elsewhere)), "--format",
                             "timm", "--out", out.name], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=600)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    from safetensors.torch import load_file
    assert "stem.0.weight" in load_file(out)
