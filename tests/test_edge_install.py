"""The edge never needs torch: importing the device-side modules and running the CLI leaves it unloaded.
And an installed copy (not the checkout) runs from anywhere, with its models in the per-user data folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_edge_modules_do_not_import_torch():
    out = run_python(
        "import sys\n"
        "import wisp_edge.engine, wisp_edge.wire.sampling, wisp_edge.wire.protocol, wisp_edge.wire.vocab\n"
        "import wisp_edge.wire.chat, wisp_edge.wire.errors\n"
        "import wisp_edge.drafters.llama_cpp, wisp_edge.cli, wisp_edge.agent, wisp_edge.local_api\n"
        "import wisp_edge.client, wisp_edge.settings, wisp_edge.wire.openai, wisp_edge.controller.policy\n"
        "print('torch' in sys.modules)\n")
    assert out.strip() == "False"


def test_edge_runtime_loads_neither_torch_nor_a_web_framework():
    """A device that only generates needs no server stack: FastAPI comes in with `wisp-edge serve` alone."""
    out = run_python(
        "import sys\n"
        "import wisp_edge.engine, wisp_edge.client, wisp_edge.agent, wisp_edge.drafters, wisp_edge.controller\n"
        "import wisp_edge.cli\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'starlette') if m in sys.modules))\n")
    assert out.strip() == "[]"


def test_edge_cli_tokenizes_without_torch():
    out = run_python(
        "import sys, io, contextlib\n"
        "from wisp_edge.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): main(['tokenize', 'Hello 123'])\n"
        "print(buf.getvalue().strip()); print('torch' in sys.modules)\n")
    payload, torch_loaded = out.strip().splitlines()
    assert json.loads(payload)["token_ids"] == [19556, 216, 33, 34, 35]
    assert torch_loaded == "False"


def test_an_installed_copy_runs_from_anywhere_and_keeps_models_in_the_user_data_dir(tmp_path):
    """A non-editable install (packages copied, no checkout around them): `wisp-edge generate --help` and
    `wisp-cloud serve --help` run from /, and the models folder is the per-user one, not a source tree's."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    for name in ("wisp_edge", "wisp_cloud"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(site), str(source)], check=True, capture_output=True)
    (site / "models").mkdir()  # a stray folder beside the packages is not taken for a checkout's
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PYTHONPATH": str(site)}  # ahead of the checkout
    for command in (["wisp_edge.cli", "generate", "--help"], ["wisp_cloud.cli", "serve", "--help"]):
        run = subprocess.run([sys.executable, "-m", *command], cwd="/", env=env, capture_output=True, text=True)
        assert run.returncode == 0 and "usage:" in run.stdout, run.stderr
    code = "import wisp_edge.drafters as d; print(d.MODELS_DIR)"
    run = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == str(tmp_path / "home" / ".local" / "share" / "wisp" / "models")
