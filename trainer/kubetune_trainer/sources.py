"""Remote sources -> local paths, before anything is loaded.

pvc:// sources arrive as local paths (the operator mounts them). This module fetches the rest:

- s3://<bucket>/<key>: that one object; s3://<bucket>/<prefix>: every object under <prefix>/, as a directory.
- hf://<org>/<name>[/<path>]: the model repository (at `model.revision`) or dataset repository (at
  `dataset.revision`), or the file or directory <path> in it.

Rank 0 plans (lists the objects with their ETags, or resolves the revision to a commit) and shares the plan, so
every rank loads the same bytes even if the source changes meanwhile. A plan names a content-addressed directory
under `sources.cacheDir`: the same objects (same ETags) or the same commit give the same directory, so a restart
or a later run reuses the download, and a changed object is fetched afresh. Rank 0 downloads into `<dir>.partial`
and renames it to `<dir>` once every file is written and synced: the directory's existence is the completion
marker, so a half-finished download is never used. The next attempt continues it: the `.partial` directory is named
for the exact objects (their ETags), so an S3 object's partial file is a prefix of that object; the rest is fetched
with a range request that S3 answers only while the object still has that ETag (If-Match), and the file must end
with the listed size. The other ranks, on every node, wait for the directory to appear: the cache is on the
checkpoint claim, which every node mounts, so one download serves the whole job.

Progress: `report(stage, done, total, unit)` is told the bytes downloaded so far (S3) as the download advances, so
that a long download is seen advancing rather than silent.

Errors: a source that cannot work as given (no such bucket, object, repository or revision; access denied; wrong
or no credentials) is a PermanentError naming the source. Network and server errors are retried with backoff,
then raised as SourceUnavailable: an ordinary failure, which the operator retries with a new attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from .config import S3Config, TrainerConfig
from .errors import PermanentError
from .files import fsync_dir
from .progress import Report, no_report
from .runtime import Runtime

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import RetryConfig

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
HF_PREFIX = "hf://"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "kubetune" / "sources"
PARTIAL = ".partial"

# Each S3 request is retried by the client (object_store) for transient errors; a whole step (a listing, one
# object's download) is retried on top of that, for failures the client does not retry (a body cut short).
S3_REQUEST_RETRY: RetryConfig = {"max_retries": 8, "retry_timeout": timedelta(minutes=2)}
ATTEMPTS = 3
BACKOFF_SECONDS = 2.0
DOWNLOAD_THREADS = 8
CHUNK_BYTES = 8 << 20
WAIT_POLL_SECONDS = 2.0

T = TypeVar("T")


class SourceUnavailable(RuntimeError):
    """A source could not be reached after retries; a later attempt may succeed."""


class Cancelled(Exception):
    """Another download of the same plan failed: stop this one."""


# ----------------------------------------------------------------------------------------------
# plans: what to fetch, decided once by rank 0
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan(ABC):
    """What to fetch for one source; rank 0 makes it and every rank uses the same."""

    role: str  # "model", "dataset" or "evalDataset"
    uri: str
    inner: str  # what the loader reads inside the plan's directory ("" = the directory itself)

    @property
    @abstractmethod
    def key(self) -> str:
        """The plan's directory under the cache: equal for equal contents, different when they change."""

    @abstractmethod
    def record(self, local: str) -> dict[str, Any]:
        """Where the bytes came from, for the run manifest."""

    @abstractmethod
    def fetch(self, dest: Path, cfg: TrainerConfig, report: Report) -> None:
        """Download into `dest`, continuing what an earlier attempt left there, retrying what may pass."""


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str  # as S3 sends it, quoted
    local: str  # path relative to the plan's directory


@dataclass(frozen=True)
class S3Plan(Plan):
    bucket: str
    objects: tuple[S3Object, ...]

    @property
    def key(self) -> str:
        listing = [[o.key, o.size, o.etag] for o in self.objects]
        return "s3-" + digest({"uri": self.uri, "objects": listing})

    def record(self, local: str) -> dict[str, Any]:
        objects = [{"key": o.key, "size": o.size, "etag": o.etag.strip('"')} for o in self.objects]
        return {"source": self.uri, "path": local, "objects": objects}

    def fetch(self, dest: Path, cfg: TrainerConfig, report: Report) -> None:
        store = s3_store(self.bucket, cfg.sources.s3)
        total = sum(o.size for o in self.objects)
        counter = ByteCounter(total, lambda done: report("downloading", done, total, "bytes"))
        log.info("%s: downloading %d objects (%s) into %s", self.uri, len(self.objects), gigabytes(total), dest)
        start = time.monotonic()
        cancel = threading.Event()

        def get(obj: S3Object) -> None:
            retrying(f"{self.role} source {self.uri}", lambda: self._get(store, obj, dest, cancel, counter))

        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, len(self.objects))) as pool:
            futures = [pool.submit(get, o) for o in self.objects]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                cancel.set()  # after a failure (or SIGTERM) the other downloads stop at their next chunk
        failures = [e for e in (f.exception() for f in futures) if e is not None and not isinstance(e, Cancelled)]
        if failures:
            raise failures[0]
        seconds = max(time.monotonic() - start, 1e-3)
        fetched = counter.fetched
        log.info(
            "%s: downloaded %s in %.1f s (%.0f MB/s)%s",
            self.uri,
            gigabytes(fetched),
            seconds,
            fetched / seconds / 1e6,
            f"; {gigabytes(total - fetched)} were already there" if fetched < total else "",
        )

    def _get(self, store: Any, obj: S3Object, dest: Path, cancel: threading.Event, counter: ByteCounter) -> None:
        import obstore
        from obstore.exceptions import PreconditionError

        target = dest / obj.local
        target.parent.mkdir(parents=True, exist_ok=True)
        have = target.stat().st_size if target.exists() else 0
        if have > obj.size:  # not a prefix of this object: start over
            target.unlink()
            have = 0
        counter.found(target, have)
        if have == obj.size:
            return
        # if_match: the bytes must be the ones rank 0 listed (or the ranks could train on different data), and the
        # continuation of a partial file must come from the object its beginning came from.
        options: dict[str, Any] = {"if_match": obj.etag}
        if have:
            options["range"] = {"offset": have}
            log.info("%s: continuing %s from byte %d of %d", self.uri, obj.key, have, obj.size)
        with permanent_errors(s3_failure, self.role, self.uri):
            try:
                result = obstore.get(store, obj.key, options=options)  # type: ignore[arg-type]
            except (PreconditionError, FileNotFoundError):
                # Replaced or deleted since the listing: a new attempt lists again.
                changed = f"{obj.key} changed during the download; the next attempt starts over"
                raise SourceUnavailable(f"{self.role} source {self.uri}: {changed}") from None
            with open(target, "r+b" if have else "wb") as f:
                f.seek(have)
                for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
                    if cancel.is_set():
                        raise Cancelled
                    f.write(chunk)
                    counter.add(target, len(chunk))
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        if target.stat().st_size != obj.size:
            raise OSError(f"{obj.key}: got {target.stat().st_size} bytes, expected {obj.size}")


class ByteCounter:
    """Bytes in place over every object of a download (shared by the download threads), reported as they grow."""

    def __init__(self, total: int, report: Callable[[int], None]) -> None:
        self.total = total
        self.fetched = 0  # bytes downloaded by this process
        self._report = report
        self._lock = threading.Lock()
        self._files: dict[Path, int] = {}

    def found(self, path: Path, size: int) -> None:
        """A file's bytes already in place (a retry or a new attempt restarts counting it from there)."""
        with self._lock:
            self._files[path] = size
            done = sum(self._files.values())
        self._report(done)

    def add(self, path: Path, n: int) -> None:
        with self._lock:
            self._files[path] = self._files.get(path, 0) + n
            self.fetched += n
            done = sum(self._files.values())
        self._report(done)


@dataclass(frozen=True)
class HubPlan(Plan):
    repo_type: str  # "model" or "dataset"
    repo_id: str
    revision: str | None
    commit: str

    @property
    def key(self) -> str:
        return "hf-" + digest({"uri": self.uri, "commit": self.commit})

    def record(self, local: str) -> dict[str, Any]:
        return {"source": self.uri, "path": local, "revision": self.revision, "commit": self.commit}

    def fetch(self, dest: Path, cfg: TrainerConfig, report: Report) -> None:
        from huggingface_hub import snapshot_download

        log.info("%s: downloading %s %s at %s into %s", self.uri, self.repo_type, self.repo_id, self.commit, dest)
        report("downloading", None, None, None)
        patterns = [self.inner, f"{self.inner}/*"] if self.inner else None

        def download() -> None:
            with permanent_errors(hub_failure, self.role, self.uri):
                snapshot_download(
                    self.repo_id,
                    repo_type=self.repo_type,
                    revision=self.commit,
                    local_dir=dest,
                    allow_patterns=patterns,
                    token=hf_token(),
                )

        retrying(f"{self.role} source {self.uri}", download)


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


# ----------------------------------------------------------------------------------------------
# parsing sources (pure)
# ----------------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    """Whether this module fetches the source."""
    return uri.startswith((S3_PREFIX, HF_PREFIX))


def repo_type(role: str) -> str:
    return "model" if role == "model" else "dataset"


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/path -> ("bucket", "some/path")."""
    bucket, _, path = uri[len(S3_PREFIX) :].partition("/")
    return bucket, path


def split_hub(uri: str) -> tuple[str, str]:
    """hf://org/name/some/path -> ("org/name", "some/path")."""
    parts = uri[len(HF_PREFIX) :].strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def local_name(role: str, uri: str, key: str, prefix: str) -> str:
    """Where an object under `prefix` lands inside the plan's directory; keys that would escape it are refused."""
    rel = key[len(prefix) :]
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise PermanentError(f"{role} source {uri}: object key {key!r} cannot be stored as a local file")
    return rel


def s3_objects(role: str, uri: str, listing: Sequence[ObjectMeta]) -> tuple[S3Object, ...]:
    """The objects of a directory source from its listing (folder markers, keys ending in '/', skipped)."""
    _, path = split_s3(uri)
    prefix = path.rstrip("/") + "/" if path.strip("/") else ""
    found = [m for m in listing if not m["path"].endswith("/")]
    objects = tuple(
        S3Object(m["path"], int(m["size"]), str(m["e_tag"]), local_name(role, uri, m["path"], prefix))
        for m in sorted(found, key=lambda m: str(m["path"]))
    )
    if not objects:
        raise PermanentError(f"{role} source {uri}: no such object, and no objects under it")
    return objects


# ----------------------------------------------------------------------------------------------
# S3
# ----------------------------------------------------------------------------------------------

_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
# object_store fetches instance credentials from these paths when the environment holds none.
_INSTANCE_CREDENTIALS = ("/latest/api/token", "/latest/meta-data/iam")


def s3_store(bucket: str, cfg: S3Config) -> Any:
    from obstore.store import S3Store

    # The store reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_REGION from the
    # environment; without keys it asks the node's instance metadata service. Requests use path-style URLs.
    kwargs: dict[str, Any] = {}
    if cfg.endpoint_url:
        kwargs["endpoint"] = cfg.endpoint_url
    if cfg.region:
        kwargs["region"] = cfg.region
    return S3Store(
        bucket,
        client_options={"allow_http": bool(cfg.endpoint_url and cfg.endpoint_url.startswith("http://"))},
        retry_config=S3_REQUEST_RETRY,
        **kwargs,
    )


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def s3_failure(role: str, uri: str, e: Exception) -> PermanentError | None:
    """The PermanentError an S3 client error amounts to, or None when retrying might help."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    where = f"{role} source {uri}"
    if any(p in first_line(e) for p in _INSTANCE_CREDENTIALS):
        return PermanentError(
            f"{where}: no S3 credentials: the workers have no AWS_ACCESS_KEY_ID (spec.storage.s3.credentialsSecretRef) "
            "and no instance role"
        )
    status_match = _STATUS.search(str(e))
    code_match = _CODE.search(str(e))
    status = int(status_match.group(1)) if status_match else None
    code = code_match.group(1) if code_match else None
    if isinstance(e, FileNotFoundError) or status == 404:
        return PermanentError(f"{where}: {'no such bucket' if code == 'NoSuchBucket' else 'no such object'}")
    if isinstance(e, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
        detail = f" ({code})" if code else ""  # a HEAD response has no body to name the cause
        return PermanentError(f"{where}: access denied{detail}: check the S3 credentials and what they may read")
    if status == 301 or code == "PermanentRedirect":
        return PermanentError(f"{where}: the bucket is in another region: set spec.storage.s3.region")
    if status is not None and 300 <= status < 500 and status not in (408, 429):
        return PermanentError(f"{where}: S3 refused the request ({f'{status} {code}' if code else status})")
    return None


@contextmanager
def permanent_errors(
    classify: Callable[[str, str, Exception], PermanentError | None], role: str, uri: str
) -> Iterator[None]:
    """Raise the PermanentError a client error amounts to; let the others through for `retrying`."""
    try:
        yield
    except (PermanentError, SourceUnavailable, Cancelled):
        raise
    except Exception as e:
        permanent = classify(role, uri, e)
        if permanent is not None:
            raise permanent from None
        raise


def plan_s3(role: str, uri: str, cfg: S3Config) -> S3Plan:
    """One object (the path names an object) or a directory (every object under path/)."""
    import obstore

    bucket, path = split_s3(uri)
    store = s3_store(bucket, cfg)
    meta = None
    with permanent_errors(s3_failure, role, uri):
        if path and not path.endswith("/"):
            with suppress(FileNotFoundError):  # not one object: a prefix, perhaps
                meta = obstore.head(store, path)
        if meta is None:
            listing = [m for batch in obstore.list(store, prefix=path.strip("/") or None) for m in batch]
    if meta is None:
        return S3Plan(role, uri, inner="", bucket=bucket, objects=s3_objects(role, uri, listing))
    if role == "model":
        raise PermanentError(f"{role} source {uri}: is one object; a model is a directory (an S3 prefix)")
    name = PurePosixPath(path).name
    obj = S3Object(path, meta["size"], str(meta["e_tag"]), name)
    return S3Plan(role, uri, inner=name, bucket=bucket, objects=(obj,))


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub models and datasets
# ----------------------------------------------------------------------------------------------


def hub_failure(role: str, uri: str, e: Exception) -> PermanentError | None:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{role} source {uri}"
    kind = repo_type(role)
    if isinstance(e, GatedRepoError):
        return PermanentError(f"{where}: the {kind} is gated: the token (HF_TOKEN) must be granted access")
    if isinstance(e, RepositoryNotFoundError):
        return PermanentError(f"{where}: no such {kind} repository, or it is private and HF_TOKEN is missing or wrong")
    if isinstance(e, RevisionNotFoundError):
        return PermanentError(f"{where}: no such revision")
    if isinstance(e, EntryNotFoundError):
        return PermanentError(f"{where}: no such file in the {kind} repository")
    if isinstance(e, OfflineModeIsEnabled):
        return PermanentError(f"{where}: the Hugging Face Hub is unreachable by configuration (HF_HUB_OFFLINE)")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if 400 <= status < 500 and status not in (408, 429):
            return PermanentError(f"{where}: the Hub refused the request ({status}: {first_line(e)})")
    return None


def plan_hub(role: str, uri: str, revision: str | None) -> HubPlan:
    from huggingface_hub import HfApi

    repo_id, inner = split_hub(uri)
    kind = repo_type(role)
    with permanent_errors(hub_failure, role, uri):
        info = HfApi(token=hf_token()).repo_info(repo_id, revision=revision, repo_type=kind)
    if not info.sha:
        raise SourceUnavailable(f"{role} source {uri}: the Hub named no commit for revision {revision or 'main'}")
    files = [s.rfilename for s in info.siblings or []]
    if inner and not any(f == inner or f.startswith(inner + "/") for f in files):
        raise PermanentError(f"{role} source {uri}: no file or directory {inner} in {repo_id} at {info.sha[:12]}")
    return HubPlan(role, uri, inner=inner, repo_type=kind, repo_id=repo_id, revision=revision, commit=info.sha)


# ----------------------------------------------------------------------------------------------
# retries, the cache, and the ranks
# ----------------------------------------------------------------------------------------------


def retrying(what: str, step: Callable[[], T]) -> T:
    """Run a step; retry anything but a PermanentError with exponential backoff, then give up retryably."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return step()
        except (PermanentError, SourceUnavailable, Cancelled):
            raise
        except Exception as e:
            if attempt == ATTEMPTS:
                raise SourceUnavailable(f"{what}: {first_line(e)} (after {ATTEMPTS} tries)") from e
            delay = BACKOFF_SECONDS * 4 ** (attempt - 1)
            log.warning("%s: %s; retrying in %.0f s", what, first_line(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def make_plan(role: str, uri: str, cfg: TrainerConfig) -> Plan:
    what = f"{role} source {uri}"
    if uri.startswith(S3_PREFIX):
        return retrying(what, lambda: plan_s3(role, uri, cfg.sources.s3))
    revision = cfg.model.revision if role == "model" else cfg.dataset.revision
    return retrying(what, lambda: plan_hub(role, uri, revision))


def ensure(plan: Plan, cache: Path, cfg: TrainerConfig, report: Report) -> Path:
    """Download the plan into the cache unless a complete copy is there, continuing an unfinished download;
    returns the complete directory."""
    final = cache / plan.key
    if final.is_dir():
        log.info("%s: using the copy in %s", plan.uri, final)
        return final
    partial = cache / (plan.key + PARTIAL)
    if partial.exists():
        log.info("%s: continuing the unfinished download in %s", plan.uri, partial)
    partial.mkdir(parents=True, exist_ok=True)
    plan.fetch(partial, cfg, report)
    (partial / ".kubetune-source.json").write_text(json.dumps(plan.record(str(final)), indent=2))
    fsync_dir(partial)
    try:
        partial.rename(final)
    except OSError:
        if not final.is_dir():  # else a late writer of an older attempt finished the same download first
            raise
    fsync_dir(cache)
    return final


def wait_for(plan: Plan, cache: Path) -> Path:
    """Rank 0 downloads; the others wait (if rank 0 fails, torchrun stops them)."""
    final = cache / plan.key
    if not final.is_dir():
        log.info("%s: waiting for rank 0 to download it into %s", plan.uri, final)
    while not final.is_dir():
        time.sleep(WAIT_POLL_SECONDS)
    return final


@dataclass(frozen=True)
class Resolved:
    config: TrainerConfig  # the config with every fetched source replaced by its local path
    records: dict[str, dict[str, Any]]  # role -> where the bytes came from (ETags or commit), for the manifest


def remote_sources(cfg: TrainerConfig) -> Iterator[tuple[str, str]]:
    for role, uri in (
        ("model", cfg.model.source),
        ("dataset", cfg.dataset.path),
        ("evalDataset", cfg.dataset.eval_path),
        *cfg.evaluation.sources(),
    ):
        if uri and is_remote(uri):
            yield role, uri


def resolve(cfg: TrainerConfig, rt: Runtime, report: Report = no_report) -> Resolved:
    """Fetch every s3:// and hf:// source into the cache (rank 0) and point the config at the copies."""
    wanted = list(remote_sources(cfg))
    if not wanted:
        return Resolved(cfg, {})
    cache = Path(cfg.sources.cache_dir) if cfg.sources.cache_dir else DEFAULT_CACHE_DIR
    plans: list[Plan] | None = [make_plan(role, uri, cfg) for role, uri in wanted] if rt.is_main else None
    plans = rt.gather_objects(plans)[0]  # every rank takes rank 0's plans
    assert plans is not None
    cache.mkdir(parents=True, exist_ok=True)
    local: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for plan in plans:
        directory = ensure(plan, cache, cfg, report) if rt.is_main else wait_for(plan, cache)
        local[plan.role] = str(directory / plan.inner) if plan.inner else str(directory)
        records[plan.role] = plan.record(local[plan.role])
    model = cfg.model.model_copy(update={"source": local.get("model", cfg.model.source)})
    dataset = cfg.dataset.model_copy(
        update={
            "path": local.get("dataset", cfg.dataset.path),
            "eval_path": local.get("evalDataset", cfg.dataset.eval_path),
        }
    )
    evaluation = cfg.evaluation.localised(local)
    return Resolved(cfg.model_copy(update={"model": model, "dataset": dataset, "evaluation": evaluation}), records)
