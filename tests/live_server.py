"""A real `wisp-cloud serve` process on a free loopback port, for tests that talk HTTP to it.

`LiveServer` starts it, stops it gracefully (`stop`) or kills it outright (`kill`, SIGKILL) and
starts it again on the same port; `rss_bytes` and `open_fds` read its memory and file descriptors
from /proc. `tiny_checkpoint` writes a small random Llama with the shipped target's tokenizer and
vocabulary: the whole HTTP surface (sessions, centralized mode, chat template) at a tiny cost per
forward, for tests about the server rather than the model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from wisp_edge.health import ServerExited, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "models" / "target"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, *args: str, log_path: Path, api_key: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, tls_ca: Path | None = None, cpus: set[int] | None = None) -> None:
        self.args, self.log_path, self.api_key, self.cpus = list(args), log_path, api_key, cpus
        self.env, self.tls_ca = dict(env or {}), tls_ca
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def client(self, *, headers: dict | None = None, timeout: float = 60.0, **kwargs) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers={**auth, **(headers or {})}, timeout=timeout,
                            verify=self._verify(), **kwargs)

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else True

    def start(self, timeout_s: float = 180.0) -> "LiveServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
        env.update(self.env)
        cmd = [sys.executable, "-m", "wisp_cloud.cli", "serve", "--port", str(self.port), *self.args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        log = open(self.log_path, "ab")
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None  # e.g. the verifier on one core
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
        log.close()  # the child holds its own copy
        try:
            if wait_healthy(self.url, timeout_s, proc=self.proc, interval_s=0.2, verify=self._verify()):
                return self
        except ServerExited as e:
            raise RuntimeError(f"server exited with {e.returncode}:\n{self.log_tail()}") from None
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye; every session and queued round on it is lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tiny_checkpoint(path: Path, *, seed: int = 0, max_seq_len: int = 512) -> Path:
    """A 2-layer, 32-wide random Llama with the shipped target's vocabulary, tokenizer and chat template
    (a short context, so that no request can make it decode for long)."""
    import torch
    from safetensors.torch import save_file

    from wisp_cloud.model.config import ModelArgs
    from wisp_cloud.model.transformer import Transformer

    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((TARGET / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=max_seq_len)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_hf_config(config))
    weights = {name: p.detach().clone().normal_(0, 0.1) for name, p in model.named_parameters()
               if name != "lm_head.weight"}
    save_file(weights, str(path / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (TARGET / name).exists():
            shutil.copy(TARGET / name, path / name)
    return path
