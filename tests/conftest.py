"""Shared fixtures: the shipped target is loaded once per test session (it is built by the README's
set-up; a missing model fails loudly with the command that builds it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

BIG_MODEL_THREADS = int(os.environ.get("WISP_TEST_THREADS", "2"))


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """Tiny-model tests run fastest on one thread (no pool hand-offs); the shipped target uses all cores."""
    torch.set_num_threads(BIG_MODEL_THREADS if "target_model" in request.fixturenames else 1)


@pytest.fixture(scope="session")
def target_model():
    from wisp_cloud.model.loader import load_model

    return load_model(MODELS / "target")


@pytest.fixture(scope="session")
def q4_pair(target_model):
    from wisp_cloud.local_pair import LocalPair

    return LocalPair.load("q4", MODELS / "target", model=target_model, n_threads=1)


@pytest.fixture(scope="session")
def student_pair(target_model):
    from wisp_cloud.local_pair import LocalPair

    return LocalPair.load("student", MODELS / "target", model=target_model, n_threads=1)


@pytest.fixture(scope="session")
def profile_path(tmp_path_factory, target_model):
    """A quick estimator profile of the shipped target, measured once per test session, so that the
    servers the tests start load it instead of measuring their own."""
    from wisp_cloud.profiler import run_profile, save_profile

    path = tmp_path_factory.mktemp("profile") / "profile.json"
    save_profile(run_profile(target_model, quick=True, progress=False), path)
    return path


@pytest.fixture(scope="session")
def verifier(tmp_path_factory, profile_path):
    """`wisp-cloud serve` of the shipped target on loopback, shared by the tests that only talk to it
    (each test that needs other flags, a kill or a clean slate starts its own)."""
    from tests.live_server import LiveServer

    log = tmp_path_factory.mktemp("verifier") / "server.log"
    with LiveServer("--threads", "1", "--profile", str(profile_path), "--log-level", "warning",
                    log_path=log) as live:
        yield live
