"""s3:// sources for real: the trainer downloading from an S3-compatible server on localhost (s3_server.py: moto,
with IAM authentication on), whose request log counts what was downloaded."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
import trainer_assets as assets
from kubetune_trainer import sources
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import EXIT_CONFIG, PermanentError
from kubetune_trainer.progress import no_report
from kubetune_trainer.train import run
from s3_server import BUCKET, S3Server, s3_server

pytestmark = pytest.mark.trainer

MODEL = f"s3://{BUCKET}/models/llama"
TRAIN = f"s3://{BUCKET}/data/train.jsonl"
EVAL = f"s3://{BUCKET}/data/eval/"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, train_jsonl: Path) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        store = server.store()
        server.put_dir("models/llama", llama_dir)
        obstore.put(store, "data/train.jsonl", train_jsonl.read_bytes())
        obstore.put(store, "data/eval/", b"")  # a folder marker, as S3 consoles create: not a file
        obstore.put(store, "data/eval/part-0.jsonl", eval_rows().encode())
        yield server


def eval_rows() -> str:
    return "".join(json.dumps(r) + "\n" for r in assets.rows(16, "prompt_completion", seed=5))


def s3_config(tmp: Path, s3: S3Server, **sections: dict[str, Any]) -> dict[str, Any]:
    """A trainer config reading the model and the data from the bucket; `sections` override."""
    base: dict[str, Any] = {
        "model": {"source": MODEL},
        "dataset": {"path": TRAIN, "evalPath": EVAL, "evalSplit": 0.0},
        "training": {"maxSteps": 4, "logEverySteps": 2},
        "sources": {"cacheDir": str(tmp / "cache"), "s3": {"endpointUrl": s3.url, "region": "us-east-1"}},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return assets.trainer_config(tmp, Path("unused"), Path("unused"), **base)


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3.credentials().items():
        monkeypatch.setenv(name, value)


def test_trains_from_s3_downloads_once_and_records_the_etags(
    tmp_path: Path, s3: S3Server, aws_env: None, train_jsonl: Path
) -> None:
    before = s3.downloads()
    first = tmp_path / "first"
    run(TrainerConfig.model_validate(s3_config(first, s3)), assets.cpu_runtime())
    manifest = json.loads((first / "out" / "manifest.json").read_text())
    assert (first / "out" / "adapter_model.safetensors").is_file()

    # The manifest names the sources as given and records exactly which objects were read.
    assert manifest["baseModel"]["source"] == MODEL and manifest["config"]["dataset"]["path"] == TRAIN
    model_etags = s3.etags("models/llama")
    recorded = manifest["sources"]["model"]
    assert {o["key"]: o["etag"] for o in recorded["objects"]} == model_etags
    assert Path(recorded["path"]).parent == first / "cache"
    assert sorted(p.name for p in Path(recorded["path"]).iterdir() if not p.name.startswith(".")) == sorted(
        k.rsplit("/", 1)[1] for k in model_etags
    )
    [train_object] = manifest["sources"]["dataset"]["objects"]
    assert train_object == {
        "key": "data/train.jsonl",
        "size": train_jsonl.stat().st_size,
        "etag": s3.etags("data")["data/train.jsonl"],
    }
    [train_file] = manifest["dataset"]["files"]
    assert train_file["path"] == manifest["sources"]["dataset"]["path"]
    assert train_file["sha256"] == hashlib.sha256(train_jsonl.read_bytes()).hexdigest()
    # The eval prefix is a directory: its folder marker is skipped, its one object read.
    assert [o["key"] for o in manifest["sources"]["evalDataset"]["objects"]] == ["data/eval/part-0.jsonl"]
    assert manifest["dataset"]["evalFiles"][0]["rows"] == 16

    downloaded = s3.downloads_since(before)
    assert downloaded == {**{k: 1 for k in model_etags}, "data/train.jsonl": 1, "data/eval/part-0.jsonl": 1}

    # A second run (a restart, or the next run of the job) on the same cache downloads nothing.
    after_first = s3.downloads()
    second = tmp_path / "second"
    cfg = s3_config(second, s3, sources={"cacheDir": str(first / "cache")})
    run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    assert s3.downloads() == after_first
    assert json.loads((second / "out" / "manifest.json").read_text())["sources"] == manifest["sources"]


def test_an_interrupted_download_continues_where_it_stopped(tmp_path: Path, s3: S3Server, aws_env: None) -> None:
    """What a killed attempt downloaded stays: the next asks only for the rest (a range, answered 206), and reports
    the bytes in place as they grow. A partial file longer than the object is no prefix of it: fetched afresh."""
    body = "".join(json.dumps({"text": f"row {i} " + "x" * 200}) + "\n" for i in range(12000)).encode()
    obstore.put(s3.store(), "data/big.jsonl", body)
    obstore.put(s3.store(), "data/small.jsonl", b'{"text": "small"}\n')
    cfg = TrainerConfig.model_validate(s3_config(tmp_path, s3))
    cache = tmp_path / "cache"
    big = sources.make_plan("dataset", f"s3://{BUCKET}/data/big.jsonl", cfg)
    small = sources.make_plan("evalDataset", f"s3://{BUCKET}/data/small.jsonl", cfg)
    cut = len(body) // 2 + 123
    (cache / f"{big.key}.partial").mkdir(parents=True)
    (cache / f"{big.key}.partial" / "big.jsonl").write_bytes(body[:cut])
    (cache / f"{small.key}.partial").mkdir(parents=True)
    (cache / f"{small.key}.partial" / "small.jsonl").write_bytes(b"x" * 100)
    reports: list[tuple[Any, ...]] = []

    got = sources.ensure(big, cache, cfg, lambda *report: reports.append(report))
    assert (got / "big.jsonl").read_bytes() == body and not (cache / f"{big.key}.partial").exists()
    assert s3.download_statuses("data/big.jsonl") == [206]
    assert reports[0] == ("downloading", cut, len(body), "bytes") and reports[-1][1] == len(body)
    assert [r[1] for r in reports] == sorted(r[1] for r in reports)

    got = sources.ensure(small, cache, cfg, no_report)
    assert (got / "small.jsonl").read_bytes() == b'{"text": "small"}\n'
    assert s3.download_statuses("data/small.jsonl") == [200]


def test_a_partial_download_is_not_continued_from_a_changed_object(tmp_path: Path, s3: S3Server, aws_env: None) -> None:
    """The rest of a partial file must come from the object its beginning came from (If-Match on the ETag)."""
    obstore.put(s3.store(), "data/moving.jsonl", b'{"text": "version one, long enough"}\n')
    cfg = TrainerConfig.model_validate(s3_config(tmp_path, s3))
    cache = tmp_path / "cache"
    plan = sources.make_plan("dataset", f"s3://{BUCKET}/data/moving.jsonl", cfg)
    (cache / f"{plan.key}.partial").mkdir(parents=True)
    (cache / f"{plan.key}.partial" / "moving.jsonl").write_bytes(b'{"text": "vers')
    obstore.put(s3.store(), "data/moving.jsonl", b'{"text": "version two, long enough"}\n')
    with pytest.raises(sources.SourceUnavailable, match=r"data/moving\.jsonl changed during the download"):
        sources.ensure(plan, cache, cfg, no_report)
    assert not (cache / plan.key).exists()


def test_an_unfinished_download_is_finished_and_a_changed_object_fetched_afresh(
    tmp_path: Path, s3: S3Server, aws_env: None
) -> None:
    store = s3.store()
    obstore.put(store, "data/changing.jsonl", b'{"text": "version one"}\n')
    cfg = TrainerConfig.model_validate(s3_config(tmp_path, s3, dataset={"path": f"s3://{BUCKET}/data/changing.jsonl"}))
    cache = tmp_path / "cache"
    plan = sources.make_plan("dataset", cfg.dataset.path, cfg)
    # What a killed download leaves: the partial directory, a file cut short, no complete directory.
    (cache / f"{plan.key}.partial").mkdir(parents=True)
    (cache / f"{plan.key}.partial" / "changing.jsonl").write_bytes(b'{"text": "ver')

    first = sources.resolve(cfg, assets.cpu_runtime())
    assert Path(first.config.dataset.path) == cache / plan.key / "changing.jsonl"
    assert Path(first.config.dataset.path).read_bytes() == b'{"text": "version one"}\n'
    assert not (cache / f"{plan.key}.partial").exists()

    obstore.put(store, "data/changing.jsonl", b'{"text": "version two"}\n')
    second = sources.resolve(cfg, assets.cpu_runtime())
    assert Path(second.config.dataset.path).parent != Path(first.config.dataset.path).parent
    assert Path(second.config.dataset.path).read_bytes() == b'{"text": "version two"}\n'
    etag = second.records["dataset"]["objects"][0]["etag"]
    assert etag == s3.etags("data")["data/changing.jsonl"] != first.records["dataset"]["objects"][0]["etag"]


@pytest.mark.parametrize(
    ("case", "source", "message"),
    [
        (
            "no-bucket",
            "s3://kt-missing/data/train.jsonl",
            "dataset source s3://kt-missing/data/train.jsonl: no such bucket",
        ),
        (
            "empty-prefix",
            f"s3://{BUCKET}/data/nothing/",
            f"s3://{BUCKET}/data/nothing/: no such object, and no objects",
        ),
        ("no-credentials", TRAIN, f"model source {MODEL}: no S3 credentials"),
    ],
)
def test_sources_that_cannot_work_are_permanent_errors(
    tmp_path: Path, s3: S3Server, aws_env: None, monkeypatch: pytest.MonkeyPatch, case: str, source: str, message: str
) -> None:
    if case == "no-credentials":
        # Without keys the client asks the instance metadata service; here nothing answers there.
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{assets.free_port()}")
        monkeypatch.setattr(sources, "S3_REQUEST_RETRY", {"max_retries": 0})
    cfg = TrainerConfig.model_validate(s3_config(tmp_path, s3, dataset={"path": source}))
    with pytest.raises(PermanentError, match=re.escape(message)):
        sources.resolve(cfg, assets.cpu_runtime())


def test_a_model_must_be_a_directory(tmp_path: Path, s3: S3Server, aws_env: None) -> None:
    cfg = TrainerConfig.model_validate(s3_config(tmp_path, s3, model={"source": f"{MODEL}/config.json"}))
    with pytest.raises(PermanentError, match="is one object; a model is a directory"):
        sources.resolve(cfg, assets.cpu_runtime())


def test_an_unreachable_store_is_retried_then_fails_retryably(
    tmp_path: Path, s3: S3Server, aws_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sources, "S3_REQUEST_RETRY", {"max_retries": 0})
    monkeypatch.setattr(sources, "BACKOFF_SECONDS", 0.01)
    dead = f"http://127.0.0.1:{assets.free_port()}"
    cfg = TrainerConfig.model_validate(s3_config(tmp_path, s3, sources={"s3": {"endpointUrl": dead}}))
    with pytest.raises(sources.SourceUnavailable, match=rf"^model source {MODEL}: .* \(after 3 tries\)$"):
        sources.resolve(cfg, assets.cpu_runtime())
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == sources.ATTEMPTS - 1 and all(m.startswith(f"model source {MODEL}: ") for m in retries)


@pytest.mark.parametrize(
    ("case", "source", "secret", "reason"),
    [
        ("wrong-secret", TRAIN, "not-the-secret", f"model source {MODEL}: access denied: check the S3 credentials"),
        ("missing-object", f"s3://{BUCKET}/data/nope.jsonl", None, f"s3://{BUCKET}/data/nope.jsonl: no such object"),
    ],
)
def test_the_worker_exits_78_with_the_reason(
    tmp_path: Path, s3: S3Server, case: str, source: str, secret: str | None, reason: str
) -> None:
    path = assets.write_config(tmp_path, s3_config(tmp_path, s3, dataset={"path": source}))
    log = tmp_path / "termination-log"
    env = assets.worker_env(**s3.credentials(secret), KUBETUNE_TERMINATION_LOG=str(log))
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_CONFIG, done.stderr[-3000:]
    assert reason in log.read_text()
    assert len(log.read_text().splitlines()) == 1
    assert (secret or s3.secret) not in done.stdout + done.stderr + log.read_text()


@pytest.mark.slow
def test_two_ranks_train_on_one_download(tmp_path: Path, s3: S3Server) -> None:
    """Under torchrun, rank 0 plans and downloads; rank 1 takes its plan and waits for the copy."""
    before = s3.downloads()
    cfg = s3_config(tmp_path, s3, training={"batchSizePerDevice": 1, "gradientAccumulationSteps": 2})
    done = assets.run_launcher(tmp_path, assets.write_config(tmp_path, cfg), **s3.credentials())
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["worldSize"] == 2 and len(set(manifest["replicaDigests"])) == 1
    downloaded = s3.downloads_since(before)
    assert set(downloaded.values()) == {1} and len(downloaded) == len(manifest["sources"]["model"]["objects"]) + 2


# -- the pure parts ---------------------------------------------------------------------------------


def test_source_forms_split_into_their_parts() -> None:
    assert sources.split_s3("s3://b/some/prefix/") == ("b", "some/prefix/")
    assert sources.split_s3("s3://b") == ("b", "")
    assert sources.split_hub("hf://acme/support") == ("acme/support", "")
    assert sources.split_hub("hf://acme/support/data/train.jsonl") == ("acme/support", "data/train.jsonl")
    assert sources.is_remote("hf://acme/support") and sources.is_remote("hf://acme/m")
    assert sources.is_remote("s3://b/m") and not sources.is_remote("/kubetune/sources/d")


def test_a_directory_listing_skips_folder_markers_and_refuses_keys_that_escape() -> None:
    listing = [
        {"path": "d/", "size": 0, "e_tag": '"m"'},
        {"path": "d/b/2.jsonl", "size": 2, "e_tag": '"b"'},
        {"path": "d/a.jsonl", "size": 1, "e_tag": '"a"'},
    ]
    objects = sources.s3_objects("dataset", "s3://bkt/d", listing)
    assert [(o.key, o.local) for o in objects] == [("d/a.jsonl", "a.jsonl"), ("d/b/2.jsonl", "b/2.jsonl")]
    plan = sources.S3Plan("dataset", "s3://bkt/d", inner="", bucket="bkt", objects=objects)
    same = sources.s3_objects("dataset", "s3://bkt/d", list(reversed(listing)))
    changed = [*listing[:2], {**listing[2], "e_tag": '"a2"'}]
    assert plan.key == sources.S3Plan("dataset", "s3://bkt/d", inner="", bucket="bkt", objects=same).key
    assert (
        plan.key
        != sources.S3Plan(
            "dataset",
            "s3://bkt/d",
            inner="",
            bucket="bkt",
            objects=sources.s3_objects("dataset", "s3://bkt/d", changed),
        ).key
    )
    for key in ("d/../../etc/passwd", "d//x", "d/./x"):
        with pytest.raises(PermanentError, match="cannot be stored as a local file"):
            sources.s3_objects("dataset", "s3://bkt/d", [{"path": key, "size": 1, "e_tag": '"x"'}])


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("status code: 403 Forbidden: <Error><Code>InvalidAccessKeyId</Code>", "access denied (InvalidAccessKeyId)"),
        ("status code: 404 Not Found: <Error><Code>NoSuchBucket</Code>", "no such bucket"),
        ("status code: 301 Moved Permanently: <Code>PermanentRedirect</Code>", "the bucket is in another region"),
        ("status code: 400 Bad Request: <Code>InvalidArgument</Code>", "S3 refused the request (400 InvalidArgument)"),
        ("Error performing PUT http://169.254.169.254/latest/api/token - error sending request", "no S3 credentials"),
        ("status code: 503 Service Unavailable: <Code>SlowDown</Code>", None),
        ("status code: 429 Too Many Requests", None),
        ("HTTP error: error sending request", None),
    ],
)
def test_s3_errors_are_permanent_only_when_retrying_cannot_help(error: str, reason: str | None) -> None:
    from obstore.exceptions import GenericError

    permanent = sources.s3_failure("model", "s3://b/m", GenericError(f"Generic S3 error: {error}"))
    if reason is None:
        assert permanent is None
    else:
        assert permanent is not None and str(permanent).startswith(f"model source s3://b/m: {reason}")


def test_evaluation_sets_and_samples_come_from_s3_too(tmp_path: Path, s3: S3Server, aws_env: None) -> None:
    obstore.put(s3.store(), "eval/general.jsonl", eval_rows().encode())
    prompts = json.dumps({"prompt": "repeat apple 2 times: "}) + "\n"
    obstore.put(s3.store(), "eval/prompts.jsonl", prompts.encode())
    evaluation = {
        "sets": [{"name": "general", "path": f"s3://{BUCKET}/eval/general.jsonl"}],
        "samples": {"path": f"s3://{BUCKET}/eval/prompts.jsonl", "maxNewTokens": 4},
    }
    before = s3.downloads()
    result = run(TrainerConfig.model_validate(s3_config(tmp_path, s3, evaluation=evaluation)), assets.cpu_runtime())
    assert result["evalSets"]["general"]["baseLoss"] > 0
    downloaded = s3.downloads_since(before)
    assert downloaded["eval/general.jsonl"] == 1 and downloaded["eval/prompts.jsonl"] == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [o["key"] for o in manifest["sources"]["evaluation set general"]["objects"]] == ["eval/general.jsonl"]
    assert [o["key"] for o in manifest["sources"]["samples"]["objects"]] == ["eval/prompts.jsonl"]
    [sample] = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert sample["prompt"] == "repeat apple 2 times: "
