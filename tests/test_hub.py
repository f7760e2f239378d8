"""The Hub, for real: push to a local Hub server (tests/hub_server.py) with the real huggingface_hub client, load back
with ddpm_hf and with plain diffusers, read the card, and every way a push can go wrong."""

import hashlib
import json
import logging
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from PIL import Image

import ddpm_hf
from ddpm_hf.cli import main as cli_main
from ddpm_hf.evaluation import EvaluationResult
from ddpm_hf.hub import HubPushError, files_to_upload, push_to_hub, render_model_card, write_model_card
from ddpm_hf.pipelines.fast_sampler import FastSampler
from ddpm_hf.schedulers.samplers import SAMPLERS
from ddpm_hf.training import DataConfig, TrainingConfig

from helpers import make_pipeline, sample
from hub_server import RESET, LocalHub, use_local_hub

ALICE_TOKEN = "hf_test_alice_4f1c9e2b7d"
BOB_TOKEN = "hf_test_bob_8a3e51c0f6"
REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN_TIMESTEPS = 20  # a short chain keeps sampling (and the card's snippets) fast
PIPELINE_FILES = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "scheduler/scheduler_config.json"}
# What a finished run records beside its config (see ddpm_hf.hub.card).
RUN_FACTS = {"global_step": 10, "num_processes": 1, "hardware": "2 CPU cores", "training_time_seconds": 75.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and many times faster than on two when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub with users alice and bob; huggingface_hub points at it (online, no Xet, empty cache, no login)."""
    # Small tree pages, so that downloads exercise the client's pagination.
    with LocalHub(tmp_path / "hub", tokens={ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}, page_size=4) as server:
        use_local_hub(monkeypatch, server.url, home=tmp_path / "hf_home")
        yield server


@pytest.fixture
def pipeline(tiny_unet_config):
    return make_pipeline(tiny_unet_config, num_train_timesteps=NUM_TRAIN_TIMESTEPS)


@pytest.fixture
def run_dir(tmp_path, pipeline):
    """A folder laid out like a training run's --output_dir: the pipeline, the sample grid, the config, and the
    checkpoints, raw weights and logs that must never be uploaded."""
    folder = tmp_path / "ddpm-run"
    pipeline.save_pretrained(folder)
    Image.new("RGB", (32, 32), "gray").save(folder / "samples.png")
    config = TrainingConfig(data=DataConfig(dataset_name="uoft-cs/cifar10", resolution=8), max_train_steps=10,
                            ddpm_num_steps=NUM_TRAIN_TIMESTEPS, ddpm_num_inference_steps=NUM_TRAIN_TIMESTEPS,
                            hub_token=ALICE_TOKEN)
    (folder / "training_config.json").write_text(json.dumps({**config.to_dict(), **RUN_FACTS}))
    for path in ("checkpoints/checkpoint-10/optimizer.bin", "checkpoints/checkpoint-10/model.safetensors",
                 "unet_raw/diffusion_pytorch_model.safetensors", "logs/events.out.tfevents", "samples/step_5.png"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(b"not for the Hub")
    return folder


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files_containing(folder: Path, secret: str) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- Push and load back ------------------------------------------------------------------------------------------


def test_push_then_load_back_with_ddpm_hf_and_plain_diffusers(hub, run_dir, pipeline, tmp_path):
    commit = push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)
    assert commit.repo_url.repo_id == "alice/ddpm-tiny"

    ours = quiet(ddpm_hf.DDPMPipeline.from_pretrained("alice/ddpm-tiny", cache_dir=tmp_path / "cache-a"))
    plain = quiet(diffusers.DDPMPipeline.from_pretrained("alice/ddpm-tiny", cache_dir=tmp_path / "cache-b"))

    assert type(ours.unet) is ddpm_hf.UNet2DModel and type(plain.unet) is diffusers.UNet2DModel
    expected = sample(pipeline, batch_size=2)
    np.testing.assert_allclose(sample(ours, batch_size=2), expected, atol=1e-5)
    np.testing.assert_allclose(sample(plain, batch_size=2), expected, atol=1e-5)


def test_uploads_the_pipeline_card_and_samples_only(hub, run_dir):
    push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    uploaded = set(HfApi().list_repo_files("alice/ddpm-tiny"))
    assert uploaded == PIPELINE_FILES | {"README.md", "samples.png", ".gitattributes"}  # .gitattributes: the Hub's own
    assert set(files_to_upload(run_dir)) == uploaded - {".gitattributes"}


def test_pushing_a_pipeline_object_uploads_the_same_pipeline(hub, run_dir, pipeline):
    push_to_hub(pipeline, "alice/from-object", token=ALICE_TOKEN)
    push_to_hub(run_dir, "alice/from-folder", token=ALICE_TOKEN)

    api = HfApi()
    assert set(api.list_repo_files("alice/from-object")) == PIPELINE_FILES | {"README.md", ".gitattributes"}

    def pipeline_blobs(repo_id):
        siblings = api.model_info(repo_id, files_metadata=True).siblings
        return {s.rfilename: s.blob_id for s in siblings if s.rfilename in PIPELINE_FILES}

    assert pipeline_blobs("alice/from-object") == pipeline_blobs("alice/from-folder")


def test_pipeline_push_to_hub_method_uploads_card_and_pipeline(hub, pipeline):
    pipeline.push_to_hub("alice/from-method", token=ALICE_TOKEN, private=True, commit_message="From the method")

    api = HfApi(token=ALICE_TOKEN)
    assert set(api.list_repo_files("alice/from-method")) == PIPELINE_FILES | {"README.md", ".gitattributes"}
    assert api.model_info("alice/from-method").private
    card = ModelCard.load("alice/from-method", token=ALICE_TOKEN)
    assert "ddpm_hf" in card.data.tags and 'from_pretrained("alice/from-method")' in card.text


def test_pipeline_push_to_hub_takes_diffusers_arguments(hub, pipeline):
    """diffusers' PushToHubMixin signature: `variant` names the weights; what ddpm_hf does not do is refused."""
    pipeline.push_to_hub("alice/fp16", token=ALICE_TOKEN, variant="fp16", safe_serialization=True, create_pr=False)
    files = set(HfApi(token=ALICE_TOKEN).list_repo_files("alice/fp16"))
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert "unet/diffusion_pytorch_model.safetensors" not in files
    loaded = ddpm_hf.DDPMPipeline.from_pretrained("alice/fp16", variant="fp16", token=ALICE_TOKEN)
    torch.testing.assert_close(loaded.unet.state_dict(), pipeline.unet.state_dict(), rtol=0, atol=0)
    for unsupported in (dict(create_pr=True), dict(safe_serialization=False), dict(subfolder="pipe")):
        with pytest.raises(ValueError, match=f"does not support {next(iter(unsupported))}"):
            pipeline.push_to_hub("alice/refused", token=ALICE_TOKEN, **unsupported)


def test_revisions_load_each_commit_and_branch(hub, run_dir, tiny_unet_config, pipeline, tmp_path):
    first = push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)
    retrained = make_pipeline(tiny_unet_config, seed=1, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    retrained.save_pretrained(run_dir)
    second = push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN, commit_message="Step 20")
    on_branch = push_to_hub(pipeline, "alice/ddpm-tiny", token=ALICE_TOKEN, revision="first-weights")
    assert len({first.oid, second.oid, on_branch.oid}) == 3

    def load(revision, cache):
        return quiet(ddpm_hf.DDPMPipeline.from_pretrained("alice/ddpm-tiny", revision=revision, cache_dir=cache))

    np.testing.assert_allclose(sample(load(first.oid, tmp_path / "c1")), sample(pipeline), atol=1e-5)
    np.testing.assert_allclose(sample(load(None, tmp_path / "c2")), sample(retrained), atol=1e-5)
    np.testing.assert_allclose(sample(load("first-weights", tmp_path / "c2")), sample(pipeline), atol=1e-5)
    assert [c.title for c in HfApi().list_repo_commits("alice/ddpm-tiny")][:1] == ["Step 20"]


@pytest.mark.parametrize("source", ["argument", "HF_TOKEN", "stored login"])
def test_token_comes_from_the_argument_the_environment_or_the_stored_login(hub, run_dir, source, monkeypatch):
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    elif source == "stored login":
        Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(constants.HF_TOKEN_PATH).write_text(ALICE_TOKEN)

    token = ALICE_TOKEN if source == "argument" else None
    commit = push_to_hub(run_dir, "alice/ddpm-tiny", token=token)

    assert commit.repo_url.repo_id == "alice/ddpm-tiny"
    assert HfApi(token=token).whoami()["name"] == "alice"


def test_bare_repo_name_goes_under_the_tokens_user(hub, run_dir):
    commit = push_to_hub(run_dir, "ddpm-tiny", token=BOB_TOKEN)

    assert commit.repo_url.repo_id == "bob/ddpm-tiny"
    assert 'from_pretrained("bob/ddpm-tiny")' in (run_dir / "README.md").read_text()


# --- Private repos and the token ---------------------------------------------------------------------------------


def test_private_repo_refuses_requests_without_the_owners_token(hub, run_dir, pipeline, tmp_path):
    push_to_hub(run_dir, "alice/secret-ddpm", private=True, token=ALICE_TOKEN)

    for token in (None, BOB_TOKEN):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info("alice/secret-ddpm")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret-ddpm", "model_index.json", token=token, cache_dir=tmp_path / "c0")
    with pytest.raises(OSError):
        ddpm_hf.DDPMPipeline.from_pretrained("alice/secret-ddpm", cache_dir=tmp_path / "c1")

    loaded = ddpm_hf.DDPMPipeline.from_pretrained("alice/secret-ddpm", token=ALICE_TOKEN, cache_dir=tmp_path / "c2")
    np.testing.assert_allclose(sample(quiet(loaded)), sample(pipeline), atol=1e-5)


def test_token_is_never_written_uploaded_or_logged(hub, run_dir, caplog, capfd, fast_retries):
    caplog.set_level(logging.DEBUG)
    push_to_hub(run_dir, "alice/secret-ddpm", private=True, token=ALICE_TOKEN)
    assert cli_main(["push", str(run_dir), "alice/secret-ddpm", "--token", ALICE_TOKEN]) == 0
    hub.fail_next("create_repo", times=fast_retries)  # and the retries' warnings must not show it either
    with pytest.raises(HubPushError) as failure:
        push_to_hub(run_dir, "alice/secret-ddpm", token=ALICE_TOKEN)

    assert ALICE_TOKEN not in str(failure.value)
    assert files_containing(run_dir, ALICE_TOKEN) == []
    assert files_containing(hub.objects, ALICE_TOKEN) == []  # every file the Hub received
    output = capfd.readouterr()
    assert ALICE_TOKEN not in output.out + output.err + caplog.text


# --- The model card ----------------------------------------------------------------------------------------------


def test_card_on_the_hub_parses_and_holds_the_metadata(hub, run_dir):
    (run_dir / "eval_results.json").write_text(json.dumps({"fid": 123.4}))
    push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    card = ModelCard.load("alice/ddpm-tiny")
    card.validate()  # the Hub's metadata check
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "diffusers",
                                                                    "unconditional-image-generation")
    assert data.tags == ["pytorch", "diffusers", "unconditional-image-generation", "ddpm", "ddpm_hf"]
    assert data.datasets == ["uoft-cs/cifar10"]
    (fid,) = data.eval_results
    assert (fid.metric_type, fid.metric_value, fid.dataset_type) == ("fid", 123.4, "uoft-cs/cifar10")
    assert "![Samples from this model (samples.png)](samples.png)" in card.text
    for row in ("| Optimizer steps | 10 |", "| Hardware | 2 CPU cores |", "| Training time | 1 min 15 s |",
                "| Diffusion steps T | 20 |",
                "| Batch size | 64 = 64 per process × 1 process × 1 accumulation step |"):
        assert row in card.text


def test_card_snippets_run_against_the_pushed_repo(hub, run_dir, tmp_path, monkeypatch):
    push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)
    readme = Path(hf_hub_download("alice/ddpm-tiny", "README.md", cache_dir=tmp_path / "card-cache"))
    snippets = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    assert len(snippets) == 3  # ddpm_hf, plain diffusers, the default fast sampler

    monkeypatch.chdir(tmp_path)
    for index, code in enumerate(snippets):
        namespace = {}
        exec(compile(code, f"README.md snippet {index}", "exec"), namespace)
        assert len(namespace["images"]) == 4
    assert Image.open(tmp_path / "ddpm_sample.png").size == (8, 8)


def test_a_measured_fast_sampler_travels_to_the_hub_and_the_card_shows_it(hub, run_dir, pipeline, tmp_path,
                                                                          monkeypatch):
    scheduler = SAMPLERS["unipc"].make_scheduler(pipeline.scheduler.config)
    measurement = {"frechet_distance": 5.2, "model_calls": 4, "ddpm_frechet_distance": 5.1, "tolerance": 0.5,
                   "floor": {"frechet_distance": 4.4, "std": 0.5, "num_images": 360}, "num_samples": 360,
                   "reference": "digits, split train, 8 px", "features": "digits-classifier-1234"}
    FastSampler.from_scheduler("unipc", scheduler, 4, measurement).save(run_dir)  # as `ddpm-hf sweep --save` does
    Image.new("RGB", (32, 32), "white").save(run_dir / "sampler_sweep.png")
    push_to_hub(run_dir, "alice/ddpm-fast", token=ALICE_TOKEN)

    fast = quiet(ddpm_hf.DDPMPipeline.from_pretrained("alice/ddpm-fast", cache_dir=tmp_path / "a").use_fast_sampler())
    assert type(fast.scheduler) is diffusers.UniPCMultistepScheduler and fast.scheduler.config.solver_type == "bh2"
    plain = diffusers.DDPMPipeline.from_pretrained("alice/ddpm-fast", cache_dir=tmp_path / "b")
    assert type(plain.scheduler) is diffusers.DDPMScheduler  # diffusers ignores the second config

    readme = Path(hf_hub_download("alice/ddpm-fast", "README.md", cache_dir=tmp_path / "c")).read_text()
    assert "![Fréchet distance against model calls, for each sampler](sampler_sweep.png)" in readme
    assert "**UniPC-2 with 4 steps**: FD_digits 5.20, against 5.10 for 20 DDPM steps and 4.40 ± 0.50" in readme
    assert "**5x fewer model calls** (4 instead of 20)" in readme
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(snippets) == 4  # ddpm_hf, plain diffusers, the fast sampler in one line and spelled out
    spelled_out = 'UniPCMultistepScheduler.from_config(\n    pipe.scheduler.config, solver_order=2, solver_type="bh2"'
    assert spelled_out in snippets[3]
    monkeypatch.chdir(tmp_path)
    for index, code in enumerate(snippets[2:]):
        namespace = {}
        exec(compile(code, f"README.md fast snippet {index}", "exec"), namespace)
        assert len(namespace["images"]) == 4


def test_card_reads_the_record_of_ddpm_hf_evaluate(tmp_path, pipeline):
    pipeline.save_pretrained(tmp_path)
    result = EvaluationResult(frechet_distance=8.5, kid=0.01, kid_std=0.002, precision=0.6, recall=0.5,
                              num_samples=360, num_reference=1797, features="inception-1a2b3c",
                              reference="uoft-cs/cifar10 test")
    record = {"model": str(tmp_path), "scheduler": "ddim", "steps": 50, "seed": 0, **result.to_dict()}  # --output
    (tmp_path / "eval_results.json").write_text(json.dumps(record))

    card = render_model_card(tmp_path)

    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("fid", 8.5), ("kid", 0.01), ("precision", 0.6), ("recall", 0.5)}
    assert "| FID | 8.5 |" in card.text and "Measured on 360 samples (ddim, 50 steps)" in card.text


def test_card_without_training_records_and_with_a_base_model(tmp_path, pipeline):
    pipeline.save_pretrained(tmp_path)

    card = render_model_card(tmp_path, "alice/finetuned", base_model="google/ddpm-cifar10-32")

    assert card.data.base_model == "google/ddpm-cifar10-32" and card.data.datasets is None
    assert "## Training" not in card.text and "Sample quality has not been measured" in card.text


def test_card_never_shows_secrets_from_the_run_records(tmp_path, pipeline):
    pipeline.save_pretrained(tmp_path)
    (tmp_path / "training_config.json").write_text(json.dumps({"hub_token": "hf_leaked", "wandb_api_key": "k3y",
                                                               "resolution": 8}))

    text = str(render_model_card(tmp_path))

    assert "hf_leaked" not in text and "k3y" not in text and "| Resolution | 8×8 |" in text


def test_hand_written_card_is_kept_unless_forced(tmp_path, pipeline, capsys):
    pipeline.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("# My own words\n")

    write_model_card(tmp_path)
    assert cli_main(["card", str(tmp_path)]) == 1
    assert (tmp_path / "README.md").read_text() == "# My own words\n"
    assert "--force" in capsys.readouterr().err

    assert cli_main(["card", str(tmp_path), "--force", "--repo-id", "alice/x"]) == 0
    assert 'from_pretrained("alice/x")' in (tmp_path / "README.md").read_text()


# --- Failures ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fast_retries(monkeypatch):
    """The push's backoff, shortened from 1, 2, 4, 8 s: the number of tries stays."""
    monkeypatch.setattr(ddpm_hf.hub.push, "RETRY_DELAYS_SECONDS", (0.01, 0.02, 0.04, 0.08))
    return len(ddpm_hf.hub.push.RETRY_DELAYS_SECONDS) + 1


def commit_requests(hub) -> int:
    return sum(1 for method, path in hub.requests if method == "POST" and "/commit/" in path)


def test_failure_mid_upload_is_clear_keeps_local_files_and_a_retry_finishes(hub, run_dir, fast_retries):
    before = fingerprint(run_dir)
    hub.fail_next("commit", times=fast_retries, status=500)  # the weights are uploaded, then every commit fails

    with pytest.raises(HubPushError) as failure:
        push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    message = str(failure.value)
    assert "'alice/ddpm-tiny'" in message and hub.url in message and "500" in message
    assert "Run the same push again" in message
    after = fingerprint(run_dir)
    assert {name: after[name] for name in before} == before and set(after) - set(before) == {"README.md"}
    uploads = [path for method, path in hub.requests if method == "PUT"]
    assert len(uploads) == 2  # the weights and samples.png
    assert commit_requests(hub) == fast_retries  # tried a bounded number of times

    push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    assert [path for method, path in hub.requests if method == "PUT"] == uploads  # nothing sent twice
    assert "unet/diffusion_pytorch_model.safetensors" in HfApi().list_repo_files("alice/ddpm-tiny")


def test_a_transient_upload_error_is_retried_by_the_client(hub, run_dir):
    hub.fail_next("lfs_upload", status=503)

    push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    assert "samples.png" in HfApi().list_repo_files("alice/ddpm-tiny")


def test_transient_failures_and_reset_connections_are_retried_with_backoff(hub, run_dir, fast_retries, caplog):
    hub.fail_next("commit", status=RESET)  # a proxy dropping the connection, then an overloaded Hub
    hub.fail_next("commit", times=2, status=503)

    commit = push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    assert commit_requests(hub) == 4
    retries = [record.message for record in caplog.records if "trying again in" in record.message]
    assert len(retries) == 3 and "Connection reset" in retries[0] and "503" in retries[1]
    assert ALICE_TOKEN not in caplog.text
    api = HfApi()
    assert [c.commit_id for c in api.list_repo_commits("alice/ddpm-tiny")][0] == commit.oid
    assert PIPELINE_FILES <= set(api.list_repo_files("alice/ddpm-tiny"))


def test_a_push_killed_midway_changes_nothing_and_the_same_push_completes_it(hub, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    released = hub.hold_next("lfs_upload")  # the first upload waits: the push is caught in the middle
    push = subprocess.Popen([sys.executable, "-m", "ddpm_hf.cli", "push", str(run_dir), "alice/killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(method == "PUT" for method, _ in hub.requests):
            assert push.poll() is None and time.monotonic() < deadline, push.stderr.read()
            time.sleep(0.02)
        push.send_signal(signal.SIGKILL)
        push.wait(timeout=30)
    finally:
        released.set()
    api = HfApi(token=ALICE_TOKEN)
    assert [c.title for c in api.list_repo_commits("alice/killed")] == ["initial commit"]  # nothing half-pushed

    commit = push_to_hub(run_dir, "alice/killed", token=ALICE_TOKEN)

    commits = api.list_repo_commits("alice/killed")
    assert [c.commit_id for c in commits] == [commit.oid, commits[1].commit_id]  # one commit, with everything
    assert set(api.list_repo_files("alice/killed")) == PIPELINE_FILES | {"README.md", "samples.png", ".gitattributes"}


def test_unreachable_hub_is_a_clear_error(run_dir, monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    use_local_hub(monkeypatch, url, home=tmp_path / "hf_home")
    before = fingerprint(run_dir)

    with pytest.raises(HubPushError, match="the Hub could not be reached") as failure:
        push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)

    assert url in str(failure.value)
    assert fingerprint(run_dir) == before


def test_offline_mode_is_a_clear_error(hub, run_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubPushError, match="offline mode is on"):
        push_to_hub(run_dir, "alice/ddpm-tiny", token=ALICE_TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("token, message", [("hf_not_a_valid_token", "refused the token"),
                                            (BOB_TOKEN, "no write access")])
def test_refused_tokens_are_clear_errors(hub, run_dir, token, message):
    with pytest.raises(HubPushError, match=message):
        push_to_hub(run_dir, "alice/ddpm-tiny", token=token)


# --- Bad input, caught before any request ------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["alice/has space", "alice/", "a/b/c", "alice/ddpm--tiny", "alice/-dash", ""])
def test_invalid_repo_ids_fail_before_any_request(hub, run_dir, repo_id):
    with pytest.raises(ValueError):
        push_to_hub(run_dir, repo_id, token=ALICE_TOKEN)
    assert hub.requests == []


def test_missing_token_fails_before_any_request(hub, run_dir):
    with pytest.raises(ValueError, match="needs a Hugging Face token.*HF_TOKEN.*hf auth login"):
        push_to_hub(run_dir, "alice/ddpm-tiny", private=True)
    assert hub.requests == []


@pytest.mark.parametrize("damage, message", [
    ("missing folder", "is not a folder"),
    ("empty folder", "model_index.json is missing"),
    ("pickled weights", r"unet/ has no \.safetensors weights \(only \.bin"),
    ("no scheduler", "scheduler/scheduler_config.json is missing"),
])
def test_a_folder_that_is_not_a_saved_pipeline_fails_before_any_request(hub, run_dir, tmp_path, damage, message):
    folder = tmp_path / "not-a-pipeline"
    if damage == "empty folder":
        folder.mkdir()
    elif damage == "pickled weights":
        folder = run_dir
        (folder / "unet/diffusion_pytorch_model.safetensors").rename(folder / "unet/diffusion_pytorch_model.bin")
    elif damage == "no scheduler":
        folder = run_dir
        (folder / "scheduler/scheduler_config.json").unlink()

    with pytest.raises(ValueError, match=message):
        push_to_hub(folder, "alice/ddpm-tiny", token=ALICE_TOKEN)
    assert hub.requests == []


# --- The command line --------------------------------------------------------------------------------------------


def test_cli_push_in_a_fresh_process(hub, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)  # the environment carries HF_ENDPOINT and the rest to the child

    result = subprocess.run([sys.executable, "-m", "ddpm_hf.cli", "push", str(run_dir), "alice/from-cli", "--private",
                             "--commit-message", "From the CLI"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert f"to {hub.url}/alice/from-cli" in result.stdout and ALICE_TOKEN not in result.stdout + result.stderr
    api = HfApi(token=ALICE_TOKEN)
    assert api.model_info("alice/from-cli").private
    assert [c.title for c in api.list_repo_commits("alice/from-cli")][0] == "From the CLI"


def test_cli_errors_are_one_clear_line(hub, tmp_path, capsys):
    assert cli_main(["push", str(tmp_path / "nowhere"), "alice/x", "--token", ALICE_TOKEN]) == 1
    assert capsys.readouterr().err.startswith("ddpm-hf push: error: ")
    with pytest.raises(SystemExit):
        cli_main(["push", str(tmp_path)])  # REPO_ID missing: argparse's usage error


def test_ddpm_hf_console_script_is_declared():
    (script,) = entry_points(group="console_scripts", name="ddpm-hf")
    assert script.value == "ddpm_hf.cli:main"


# --- End to end: train, push, load back --------------------------------------------------------------------------


def test_train_a_tiny_model_push_it_and_load_it_back(hub, tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "ddpm-e2e"
    train_main = runpy.run_path(str(REPO_ROOT / "examples" / "train.py"))["main"]

    status = train_main([
        "--model_config", "micro", "--resolution", "8", "--max_train_samples", "16", "--train_batch_size", "8",
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--lr_warmup_steps", "0", "--logger", "none",
        "--ddpm_num_steps", str(NUM_TRAIN_TIMESTEPS), "--ddpm_num_inference_steps", str(NUM_TRAIN_TIMESTEPS),
        "--eval_batch_size", "4", "--output_dir", str(output_dir),
        "--push_to_hub", "--hub_model_id", "alice/ddpm-e2e", "--hub_private_repo", "--hub_token", ALICE_TOKEN,
    ])

    assert status == 0 and (output_dir / "checkpoints").is_dir() and (output_dir / "unet_raw").is_dir()
    local = quiet(ddpm_hf.DDPMPipeline.from_pretrained(output_dir))
    ours = ddpm_hf.DDPMPipeline.from_pretrained("alice/ddpm-e2e", token=ALICE_TOKEN, cache_dir=tmp_path / "c1")
    plain = diffusers.DDPMPipeline.from_pretrained("alice/ddpm-e2e", token=ALICE_TOKEN, cache_dir=tmp_path / "c2")
    ours, plain = quiet(ours), quiet(plain)
    np.testing.assert_allclose(sample(ours), sample(local), atol=1e-5)
    np.testing.assert_allclose(sample(plain), sample(local), atol=1e-5)

    api = HfApi(token=ALICE_TOKEN)
    assert api.model_info("alice/ddpm-e2e").private
    files = set(api.list_repo_files("alice/ddpm-e2e"))
    assert files == PIPELINE_FILES | {"README.md", "samples.png", "eval_results.json", ".gitattributes"}
    card = ModelCard.load("alice/ddpm-e2e", token=ALICE_TOKEN)
    assert card.data.library_name == "diffusers" and "| Optimizer steps | 2 |" in card.text
    assert "Measured on 360 samples (dpm-solver-sde, 20 steps)" in card.text  # the run measured itself at the end

    output = capfd.readouterr()
    assert ALICE_TOKEN not in output.out + output.err + caplog.text
    assert files_containing(output_dir, ALICE_TOKEN) == [] and files_containing(hub.objects, ALICE_TOKEN) == []
