"""The edge never needs torch: importing the device-side modules and running the CLI leaves it unloaded."""

import json
import subprocess
import sys


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_edge_modules_do_not_import_torch():
    out = run_python(
        "import sys\n"
        "import wisp_edge.engine, wisp_edge.sampling, wisp_edge.protocol, wisp_edge.vocab, wisp_edge.chat\n"
        "import wisp_edge.drafters.llama_cpp, wisp_edge.cli, wisp_edge.agent, wisp_edge.local_api\n"
        "import wisp_edge.client, wisp_edge.settings, wisp_edge.openai_compat, wisp_edge.controller.policy\n"
        "print('torch' in sys.modules)\n")
    assert out.strip() == "False"


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
