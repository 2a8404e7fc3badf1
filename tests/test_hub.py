"""Uploads (modeling_ijepa/hub.py, scripts/push_to_hub.py, the conversion script's --push_to_hub) against a small
local Hub endpoint, and model cards (modeling_ijepa/cards.py, modeling_ijepa/model_cards/), also after a regular
(non-editable) install.

`FakeHub` answers, on loopback, the HTTP calls the real `huggingface_hub` client makes for `create_repo`,
`create_branch` and `create_commit` (validate-yaml, preupload, commit); it stores what arrives so the tests can
check it. Anything else is answered 404 and recorded, and the tests assert there was nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from modeling_ijepa import ijepa_config_from_preset
from modeling_ijepa.cards import (
    META_WEIGHTS_LICENSE,
    Provenance,
    Result,
    TrainingFacts,
    classifier_card,
    encoder_card,
    pretraining_card,
    save_card,
)
from modeling_ijepa.hub import HubUploadError, files_to_upload, push_folder_to_hub

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token_for_the_fake_hub"
# Best-effort lookups a fresh huggingface_hub process makes on its own (the agent-harness registry for its
# user-agent header; a 404 makes it fall back silently). Not part of the upload protocol.
AUXILIARY_GETS = {"/api/agent-harnesses"}


class FakeHub:
    """A minimal model Hub: repos, branches, commits with inline ("regular") files."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.unexpected: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.validated: list[str] = []
        self.preuploads: list[dict] = []
        self.commits: list[dict] = []  # {"repo_id", "revision", "summary", "description", "files": {path: bytes}}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return None

            def _reply(self, status: int, payload: dict):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self.path.split("?")[0] not in AUXILIARY_GETS:
                    hub.unexpected.append(("GET", self.path))
                self._reply(404, {"error": "not served by FakeHub"})

            def do_POST(self):
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                elif path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    match = re.match(r"---\n(.*?)\n---\n", content, re.S)
                    try:
                        metadata = yaml.safe_load(match.group(1)) if match else None
                    except yaml.YAMLError as error:
                        self._reply(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
                        return
                    if not isinstance(metadata, dict):
                        self._reply(400, {"errors": [{"message": "no YAML metadata block"}]})
                        return
                    self._reply(200, {"warnings": []})
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    files = json.loads(body)["files"]
                    hub.preuploads.append({"repo_id": m.group(1), "revision": m.group(2), "files": files})
                    self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                 "oid": None} for f in files]})
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
                    hub.branches.append((m.group(1), m.group(2)))
                    self._reply(200, {})
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                             for item in lines if item["key"] == "file"}
                    others = [item["key"] for item in lines if item["key"] not in ("header", "file")]
                    oid = hashlib.sha1(body).hexdigest()
                    hub.commits.append({"repo_id": m.group(1), "revision": m.group(2), "summary": header["summary"],
                                        "description": header.get("description"), "files": files, "others": others})
                    self._reply(200, {"success": True, "commitOid": oid,
                                      "commitUrl": f"{hub.endpoint}/{m.group(1)}/commit/{oid}"})
                else:
                    hub.unexpected.append(("POST", path))
                    self._reply(404, {"error": "not served by FakeHub"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def no_saved_token(monkeypatch, tmp_path):
    """No token from the environment, OIDC or a saved login."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))


@pytest.fixture
def online(monkeypatch):
    """The test suite runs with HF_HUB_OFFLINE=1; uploads to the loopback endpoint need it off."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def tiny_card():
    config = ijepa_config_from_preset("tiny-cpu")
    return pretraining_card(
        config,
        provenance=Provenance(source="trained with scripts/pretrain.py (test)", license="apache-2.0"),
        training=TrainingFacts(dataset="Fashion-MNIST train", dataset_id="zalando-datasets/fashion_mnist", steps=10,
                               batch_size=8, final_loss=0.5),
    )


def make_folder(path: Path) -> dict[str, bytes]:
    """A small output directory: weights (binary), config, card, a nested file, and things never uploaded."""
    path.mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "ijepa"}\n',
        "model.safetensors": bytes(range(256)) * 64,
        "nested/preprocessor_config.json": b"{}\n",
    }
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    save_card(tiny_card(), path)
    files["README.md"] = (path / "README.md").read_bytes()
    (path / "__pycache__").mkdir()
    (path / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    return files


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# Uploads


def test_push_folder_to_hub__one_commit_with_every_file(hub, tmp_path, online):
    files = make_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    info = push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", private=True, token=TOKEN,
                              endpoint=hub.endpoint, commit_message="Add I-JEPA test checkpoint")
    assert hub.unexpected == []
    assert hub.created == [{"name": "ijepa-test", "organization": "someone", "visibility": "private", "type": "model"}]
    assert len(hub.validated) == 1 and hub.validated[0] == files["README.md"].decode()
    assert sorted(f["path"] for f in hub.preuploads[0]["files"]) == sorted(files)
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit["repo_id"], commit["revision"], commit["summary"]) == ("someone/ijepa-test", "main",
                                                                         "Add I-JEPA test checkpoint")
    assert commit["files"] == files and commit["others"] == []  # byte-identical, nothing from __pycache__
    assert info.commit_url.startswith(f"{hub.endpoint}/someone/ijepa-test/commit/")
    assert snapshot(tmp_path / "run") == before
    assert files_to_upload(tmp_path / "run") == sorted(files)


def test_push_folder_to_hub__revision_creates_branch_and_commits_there(hub, tmp_path, online):
    make_folder(tmp_path / "run")
    push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", revision="step-100", token=TOKEN,
                       endpoint=hub.endpoint)
    assert hub.branches == [("someone/ijepa-test", "step-100")]
    assert [c["revision"] for c in hub.commits] == ["step-100"]
    assert hub.commits[0]["summary"] == "Upload run (4 files)"
    assert hub.unexpected == []


def test_push_folder_to_hub__offline_mode_says_what_to_do(hub, tmp_path, monkeypatch):
    make_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match=r"HF_HUB_OFFLINE=1.*retry later with:\n  python scripts/push_to_hub.py"):
        push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == [] and snapshot(tmp_path / "run") == before


def test_push_folder_to_hub__no_token_says_what_to_do(hub, tmp_path, online, no_saved_token):
    make_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(HubUploadError, match=r"no Hugging Face token.*hf auth login.*HF_TOKEN"):
        push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", endpoint=hub.endpoint)
    assert hub.requests == [] and snapshot(tmp_path / "run") == before


def test_push_folder_to_hub__no_network_says_what_to_do(tmp_path, online):
    make_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with FakeHub() as closed:  # take a free port, then close it: nothing listens there
        endpoint = closed.endpoint
    with pytest.raises(HubUploadError, match=r"Cannot reach the Hub at http://127\.0\.0\.1.*Nothing was uploaded"):
        push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", token=TOKEN, endpoint=endpoint)
    assert snapshot(tmp_path / "run") == before


def test_push_folder_to_hub__rejected_token_says_what_to_do(hub, tmp_path, online):
    make_folder(tmp_path / "run")
    with pytest.raises(HubUploadError, match=r"HTTP 401.*hf auth login"):
        push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", token="hf_wrong", endpoint=hub.endpoint)
    assert hub.commits == []


def test_push_folder_to_hub__invalid_card_metadata_is_refused_before_upload(hub, tmp_path, online):
    make_folder(tmp_path / "run")
    (tmp_path / "run" / "README.md").write_text("---\nlicense: [unclosed\n---\n\n# card\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        push_folder_to_hub(tmp_path / "run", "someone/ijepa-test", token=TOKEN, endpoint=hub.endpoint)
    assert hub.commits == [] and hub.preuploads == []




def run_script(args: list[str], env_updates: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_updates)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        if name not in env_updates:
            env.pop(name, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh Python process importing torch + transformers (~30 s on 2 shared cores)
def test_push_to_hub_script__uploads_through_hf_endpoint(hub, tmp_path):
    """The real script in a fresh process, configured only by environment variables (HF_ENDPOINT, HF_TOKEN)."""
    files = make_folder(tmp_path / "run")
    script = str(REPO_ROOT / "scripts" / "push_to_hub.py")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home")}
    done = run_script([script, str(tmp_path / "run"), "--repo_id", "someone/from-cli", "--private"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{hub.endpoint}/someone/from-cli/commit/" in done.stdout
    assert len(hub.commits) == 1 and hub.commits[0]["files"] == files and hub.unexpected == []
    assert hub.created[0]["visibility"] == "private"


@pytest.mark.slow  # a fresh Python process, as above
def test_push_to_hub_script__offline_exits_with_advice_and_no_traceback(hub, tmp_path):
    make_folder(tmp_path / "run")
    script = str(REPO_ROOT / "scripts" / "push_to_hub.py")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    done = run_script([script, str(tmp_path / "run"), "--repo_id", "someone/from-cli"], env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    stderr = done.stderr
    assert stderr.startswith("error: Cannot upload to someone/from-cli: Hugging Face offline mode is on")
    assert f"python scripts/push_to_hub.py {tmp_path / 'run'} --repo_id someone/from-cli" in stderr
    assert hub.requests == []


def test_convert_script_push_to_hub__uploads_pretraining_and_encoder_dirs(hub, tmp_path, online, monkeypatch):
    """The conversion script's --push_to_hub: both directories, one commit each, after they were written."""
    from test_conversion import HEADS, ConvertCommand, official_checkpoint  # tests/ is on sys.path under pytest
    import torch

    torch.save(official_checkpoint(ddp_prefix=True), tmp_path / "IN1K-vit.synthetic-7e.pth.tar")
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    report = ConvertCommand.main([
        "--checkpoint", str(tmp_path / "IN1K-vit.synthetic-7e.pth.tar"), "--output_dir", str(tmp_path / "out"),
        "--export_encoder", str(tmp_path / "enc"), "--num_attention_heads", str(HEADS), "--push_to_hub",
        "--hub_repo_id", "someone/ijepa-synthetic", "--encoder_repo_id", "someone/ijepa-synthetic-target",
    ])
    assert hub.unexpected == []
    assert [(c["repo_id"], c["summary"].split(" from ")[0]) for c in hub.commits] == [
        ("someone/ijepa-synthetic", "Add I-JEPA pretraining checkpoint converted"),
        ("someone/ijepa-synthetic-target", "Add I-JEPA target encoder exported"),
    ]
    pretraining_files, encoder_files = (set(c["files"]) for c in hub.commits)
    assert {"README.md", "config.json", "model.safetensors", "modeling_ijepa.py", "configuration_ijepa.py",
            "masking_ijepa.py"} <= pretraining_files
    assert encoder_files == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"}
    assert report["hub_commit"].startswith(f"{hub.endpoint}/someone/ijepa-synthetic/commit/")
    encoder_card_text = hub.commits[1]["files"]["README.md"].decode()
    metadata = yaml.safe_load(encoder_card_text.split("---\n")[1])
    assert metadata["base_model"] == "someone/ijepa-synthetic"
    assert metadata["datasets"] == ["ILSVRC/imagenet-1k"] and metadata["license"] == META_WEIGHTS_LICENSE


# ---------------------------------------------------------------------------------------------------------------------
# Model cards


def test_cards__pretraining_card_parses_with_metadata(tmp_path):
    save_card(tiny_card(), tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert {"ijepa", "self-supervised-learning", "custom_code"} <= set(data["tags"])
    assert "model-index" not in data and "model_name" not in data  # no measured results, no model-index
    assert "trust_remote_code=True" in card.text and "| optimizer steps | 10 |" in card.text
    assert "| final loss | 0.5000 |" in card.text and "@inproceedings{assran2023self" in card.text


def test_cards__encoder_card_says_which_encoder(tmp_path):
    config = ijepa_config_from_preset("vit-huge-14")
    provenance = Provenance(source="Converted from Meta's official checkpoint IN1K-vit.h.14-300e.pth.tar.",
                            base_model="someone/ijepa-vith14-1k")
    for which in ("target", "context"):
        card = encoder_card(config, which=which, provenance=provenance,
                            training=TrainingFacts(dataset="ImageNet-1k", dataset_id="ILSVRC/imagenet-1k", epochs=300))
        save_card(card, tmp_path)
        loaded = ModelCard.load(tmp_path / "README.md")
        data = loaded.data.to_dict()
        assert data["license"] == "cc-by-nc-4.0" and data["base_model"] == "someone/ijepa-vith14-1k"
        assert data["pipeline_tag"] == "image-feature-extraction" and f"{which}-encoder" in data["tags"]
        assert f"**{which} encoder**" in loaded.text and "ViT-H/14 (224 px)" in loaded.text
    with pytest.raises(ValueError, match="'target' or 'context'"):
        encoder_card(config, which="ema", provenance=provenance)


def test_cards__classifier_card_has_model_index_with_measured_results(tmp_path):
    config = ijepa_config_from_preset("tiny-cpu", num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"},
                                      label2id={"cat": 0, "dog": 1, "owl": 2})
    card = classifier_card(
        config,
        provenance=Provenance(source="Fine-tuned from someone/ijepa-tiny.", license="apache-2.0",
                              base_model="someone/ijepa-tiny"),
        training=TrainingFacts(dataset="Fashion-MNIST train", dataset_id="zalando-datasets/fashion_mnist",
                               steps=200, batch_size=64, recipe="AdamW, lr 1e-3, cosine"),
        results=[Result(dataset_name="Fashion-MNIST", dataset_type="zalando-datasets/fashion_mnist",
                        metric_type="accuracy", value=0.8125, metric_name="Top-1 accuracy")],
        protocol="linear probe (frozen encoder)",
        repo_id="someone/ijepa-tiny-fmnist",
    )
    save_card(card, tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["pipeline_tag"] == "image-classification" and data["base_model"] == "someone/ijepa-tiny"
    (entry,) = data["model-index"]
    assert entry["name"] == "someone/ijepa-tiny-fmnist"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "Fashion-MNIST", "type": "zalando-datasets/fashion_mnist", "split": "test"}
    assert result["metrics"] == [{"type": "accuracy", "value": 0.8125, "name": "Top-1 accuracy"}]
    text = (tmp_path / "README.md").read_text()
    assert "linear, 3 classes: cat, dog, owl" in text and "| Fashion-MNIST | test | Top-1 accuracy | 0.8125 |" in text


# Everything setup.py needs to build the package, copied out so the build writes nothing into the checkout.
BUILD_INPUTS = ("setup.py", "README.md", "MANIFEST.in", "modeling_ijepa")


def test_cards__templates_ship_in_a_regular_install(tmp_path):
    # Before: TEMPLATE_DIR pointed outside the package, at site-packages/model_cards, after a non-editable install.
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    target = tmp_path / "site-packages"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    assert sorted(p.name for p in (target / "modeling_ijepa" / "model_cards").iterdir()) == [
        "classifier.md", "encoder.md", "pretraining.md"
    ]
    code = f"""
        import modeling_ijepa.cards as cards
        from modeling_ijepa import ijepa_config_from_preset
        assert cards.__file__.startswith({str(target)!r}), cards.__file__
        assert str(cards.TEMPLATE_DIR).startswith({str(target)!r}), cards.TEMPLATE_DIR
        card = cards.encoder_card(ijepa_config_from_preset("tiny-cpu"), which="target",
                                  provenance=cards.Provenance(source="a test"))
        print(cards.save_card(card, {str(tmp_path)!r}))
    """
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and "target-encoder" in card.data.tags


def test_hub_module__imports_with_the_http_client_of_huggingface_hub_1(monkeypatch):
    # huggingface_hub 1.x (allowed by setup.py) uses httpx, 2.x httpx2. Before: `import httpx2` at module level.
    fake_httpx = types.ModuleType("httpx")
    fake_httpx.TransportError = type("TransportError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "httpx2", None)  # import fails, as where huggingface_hub 1.x is installed
    monkeypatch.setitem(sys.modules, "httpx", fake_httpx)
    spec = importlib.util.spec_from_file_location("hub_with_httpx", REPO_ROOT / "modeling_ijepa" / "hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.http_transport_errors() == (fake_httpx.TransportError, ConnectionError)
