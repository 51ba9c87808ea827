"""One declaration per setting: the flags of both CLIs come from the settings fields, and the models folder
follows one rule (explicit path > $WISP_MODELS_DIR > the source tree's models/ > the per-user data folder)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from wisp_cloud.settings import ServeSettings
from wisp_edge.cli import _parser as edge_parser
from wisp_edge.controller.policy import POLICIES
from wisp_edge.settings import EdgeSettings
from wisp_edge.wire import paths
from wisp_edge.wire.flags import add_flags, fields_of, given


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, ServeSettings)
    return parser


def test_every_serve_setting_is_a_flag_and_only_given_flags_override():
    parser = _serve_parser()
    spelled = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--" + name.replace("_", "-") for name in fields_of(ServeSettings)} <= spelled
    assert given(parser.parse_args([]), ServeSettings) == {}
    args = parser.parse_args(["--api-key", "a", "--api-key", "b,c", "--no-online-refit", "--port", "0",
                              "--policy", "fcfs"])
    assert given(args, ServeSettings) == {"api_key": "a,b,c", "online_refit": False, "port": 0, "policy": "fcfs"}


def test_help_is_the_field_description_with_its_default():
    help_of = {a.dest: a.help for a in _serve_parser()._actions}
    assert help_of["max_draft"] == "longest draft block accepted (default: 32)"
    assert help_of["threads"] == "torch CPU threads"  # no default to show


def test_edge_flags_spell_the_settings_with_their_short_forms():
    parser = edge_parser()
    args = parser.parse_args(["generate", "--prompt", "hi", "-k", "3", "--slo", "5", "--no-draft-ahead"])
    assert given(args, EdgeSettings) == {"draft_length": 3, "slo_tokens_per_s": 5.0, "draft_ahead": False}
    assert get_args(fields_of(EdgeSettings)["policy"].annotation) == POLICIES  # the controller's registry is the list


def test_models_dir_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    assert paths.models_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "env"))
    assert paths.models_dir() == tmp_path / "env"
    assert paths.resolve_drafter_path("q4") == tmp_path / "env" / paths.SHIPPED_DRAFTERS["q4"]
    assert paths.resolve_drafter_path("my.gguf") == Path("my.gguf")
    monkeypatch.delenv(paths.ENV_VAR)
    assert paths.source_tree_models(tmp_path) is None  # no models/ here
    (tmp_path / "models").mkdir()
    assert paths.source_tree_models(tmp_path) == tmp_path / "models"  # a checkout or the app's bundle
    (tmp_path / "wisp-0.1.0.dist-info").mkdir()
    assert paths.source_tree_models(tmp_path) is None  # pip installed it: not a source tree
    monkeypatch.setattr(paths, "source_tree_models", lambda: None)
    assert paths.models_dir() == paths.user_models_dir() and paths.models_dir().parts[-2:] == ("wisp", "models")


def test_a_ttft_target_reaches_the_wisp_scheduler_as_its_prefill_wait():
    from wisp_cloud.estimator import TimeEstimator
    from wisp_cloud.service import make_scheduler

    est = TimeEstimator((5.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    parser = _serve_parser()
    settings = ServeSettings(**given(parser.parse_args(["--ttft-slo-s", "5"]), ServeSettings))
    assert make_scheduler(settings, est).prefill_wait_s == 1.0
    assert make_scheduler(ServeSettings(ttft_slo_s=5, prefill_wait_s=0.25), est).prefill_wait_s == 0.25
    assert make_scheduler(ServeSettings(), est).prefill_wait_s is None
