"""The upload path of `surgery publish` against a local stand-in for the Hub API (tests/hub_standin.py):
what huggingface_hub sends (create repo, preupload listing the files, one commit carrying them), and the
failures (no token, token rejected, unreachable Hub, failed commit), none of which is recorded as published."""

import json

import pytest
import torch
import yaml

import huggingface_hub.hf_api
from huggingface_hub import constants
from hub_standin import COMMIT_OID, StandInHub
from publish_runs import make_run
from surgery.cli.entry import main

REPO = "my-user/tiny-ln-free"
TOKEN = "hf_standin_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # the single-commit path
    yield server
    server.close()


@pytest.fixture
def no_check(monkeypatch):
    """Skip the reload check (its own tests are in test_publish.py) where only the Hub side is under test."""
    import surgery.publish.assemble as assemble

    stub = {"loader": "stub", "blocks": 4, "block_size": 64, "max_abs_logit_diff": 0.0}
    monkeypatch.setattr(assemble, "check_folder", lambda *a: stub)


def without_validate(hub) -> list[str]:
    return [r for r in hub.routes() if r != "validate"]


def publish_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["publish", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_upload_sends_the_folder_in_one_commit(hub, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    rc, out, err = publish_cli(capsys, str(run), "--repo-id", REPO)
    assert rc == 0, err
    # huggingface_hub validates the card's YAML (one or more times) before hashing and uploading
    assert without_validate(hub) == ["create", "preupload", "commit"] and "validate" in hub.routes()
    assert all(r["auth"] == f"Bearer {TOKEN}" and r["method"] == "POST" for r in hub.requests)
    create, preupload, commit = (r for r in hub.requests if r["route"] != "validate")
    validate = next(r for r in hub.requests if r["route"] == "validate")
    assert create["body"]["name"] == "tiny-ln-free" and create["body"]["organization"] == "my-user"
    assert create["body"].get("visibility", "public") == "public" and create["body"].get("type", "model") == "model"
    assert preupload["path"] == f"/api/models/{REPO}/preupload/main" and commit["path"] == f"/api/models/{REPO}/commit/main"
    sent = {f["path"] for f in preupload["body"]["files"]}
    assert sent == set(hub.files) == {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                      "tokenizer_config.json", "recipe.yaml", "metrics.json", "plots/loss.png",
                                      "verify/report.json", "verify/report.md"}
    assert hub.files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    assert hub.files["metrics.json"] == (run / "metrics.json").read_bytes()
    card = hub.files["README.md"].decode()
    assert validate["body"]["content"] == card and "| validation loss, LN-free (nats/token) | 4.0568 |" in card
    assert "ln-free" in yaml.safe_load(card.split("---\n")[1])["tags"]
    record = json.loads((run / "published.json").read_text())
    assert record["repo_id"] == REPO and record["commit"] == COMMIT_OID and "model.safetensors" in record["files"]
    assert f"published {REPO}: {hub.url}/{REPO}/commit/{COMMIT_OID}" in out


def test_private_repo_on_a_branch(hub, no_check, tmp_path, capsys):
    run = make_run(tmp_path / "run", verify=False)
    rc, _, err = publish_cli(capsys, str(run), "--repo-id", REPO, "--private", "--revision", "v1")
    assert rc == 0, err
    assert without_validate(hub) == ["create", "branch", "preupload", "commit"]
    assert hub.requests[0]["body"]["visibility"] == "private"
    assert hub.requests[1]["path"] == f"/api/models/{REPO}/branch/v1" and hub.requests[-1]["path"] == f"/api/models/{REPO}/commit/v1"
    assert json.loads((run / "published.json").read_text())["revision"] == "v1"


def test_missing_token(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    run = make_run(tmp_path / "run", verify=False)
    rc, _, err = publish_cli(capsys, str(run), "--repo-id", REPO)
    assert rc == 2 and "no Hugging Face token found: log in with `hf auth login`" in err and "or set HF_TOKEN" in err
    assert hub.requests == [] and not (run / "published.json").exists()


def test_invalid_repo_id_sends_nothing(hub, tmp_path, capsys):
    run = make_run(tmp_path / "run", verify=False)
    rc, _, err = publish_cli(capsys, str(run), "--repo-id", "my user/x")
    assert rc == 2 and "invalid repo id 'my user/x'" in err
    assert hub.requests == [] and not (run / "published.json").exists()


def test_unreachable_hub(hub, no_check, tmp_path, capsys):
    hub.close()  # nothing listens on the port any more
    run = make_run(tmp_path / "run", verify=False)
    rc, _, err = publish_cli(capsys, str(run), "--repo-id", REPO)
    assert rc == 2 and f"could not reach the Hugging Face Hub at {hub.url}" in err
    assert "check the network connection and HF_ENDPOINT. Nothing was uploaded" in err
    assert not (run / "published.json").exists()


def test_rejected_token(hub, no_check, tmp_path, capsys):
    hub.fail["create"] = 401
    run = make_run(tmp_path / "run", verify=False)
    rc, _, err = publish_cli(capsys, str(run), "--repo-id", REPO)
    assert rc == 2 and "rejected the token (401 Unauthorized)" in err and "Nothing was uploaded" in err
    assert hub.routes()[0] == "create" and not {"preupload", "commit"} & set(hub.routes())  # (then a repo_info GET)
    assert not (run / "published.json").exists()


def test_failed_commit_is_not_claimed(hub, no_check, tmp_path, capsys):
    hub.fail["commit"] = 500
    run = make_run(tmp_path / "run", verify=False)
    rc, out, err = publish_cli(capsys, str(run), "--repo-id", REPO)
    assert rc == 2 and hub.routes()[-1] == "commit" and hub.files == {}
    assert f"uploading to {REPO} failed: the Hub at {hub.url} answered 500" in err
    assert "this upload was not committed to it" in err and "published" not in out
    assert not (run / "published.json").exists()


def test_offline_mode_is_named(hub, no_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = make_run(tmp_path / "run", verify=False)
    rc, _, err = publish_cli(capsys, str(run), "--repo-id", REPO)
    assert rc == 2 and "HF_HUB_OFFLINE" in err and "--dry-run" in err and hub.requests == []
