"""`make images`: the Dockerfile's `operator` and `trainer` targets, built without a Docker daemon, for the real nodes.

    python -m kubetune_dev.images            # (make images) build what changed, push it, print the references

podman (with runc: crun fails on this kind of cgroup v1 hybrid host) builds the unchanged Dockerfile on a Python base
image made here from Debian packages with mmdebstrap (the Dockerfile's PYTHON_IMAGE argument; no Docker Hub), then
pushes to a local registry whose storage every local cluster's nodes pull from. Everything lives under
$KUBETUNE_CACHE/images (podman's store, configuration and temp files) and $KUBETUNE_CACHE/registry, shared by all
checkouts of the machine:

- An image's tag is a content key over the Dockerfile, the files the build copies (what .dockerignore lets in) and
  the base image, so every checkout runs its own code and an unchanged checkout builds nothing: seconds.
- podman's layer cache keeps the heavy dependency layers (the trainer's are ~7 GB), which depend only on
  pyproject.toml and constraints.txt; a code change rebuilds only the small layers on top of them, and the store,
  the registry and each node's containerd hold one copy of the heavy layers for all checkouts.
- One build at a time per machine (a lock); old tags are pruned (the newest KEEP per image stay).

Pods name the images `kubetune.local/kubetune/kubetune-<target>:<key>`; each cluster's containerd maps the host
kubetune.local to its own registry process (kubetune_dev.realnodes).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kubetune_dev.toolchain import toolchain_bin

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
ROOT = CACHE / "images"
REGISTRY_STORAGE = CACHE / "registry"
# What pods and the chart name; each cluster's containerd resolves it to its own registry process.
REGISTRY = "kubetune.local"
TARGETS = ("operator", "trainer")
PAUSE = "pause"  # the pod sandbox image (hack/toolchain/pause), not from the Dockerfile
KEEP = 4  # tags kept per image, newest first: a few checkouts' worth
FINAL_LAYERS = 2  # the layers of a target's last stage (the wheel, its install): all a code change rebuilds

DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES = (
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE} main",
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {DEBIAN_SUITE}-security main",
)
# python-is-python3: the Dockerfile runs `python -m venv`; python3-venv brings ensurepip.
BASE_PACKAGES = ("ca-certificates", "python3", "python3-venv", "python-is-python3")
# CA certificates this host trusts beyond Debian's (an egress proxy's): pip inside the build needs them too.
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
BASE_REPOSITORY = "localhost/kubetune/python-base"


def say(text: str) -> None:
    print(f"[images] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# what an image is made of: content keys
# ----------------------------------------------------------------------------------------------


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore with these patterns lets `path` into the build context (the last match wins)."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").rstrip("/")
        matched = any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", "*/"))
            for prefix in prefixes
        ) or (pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts))
        if matched:
            allowed = negate
    return allowed


def dockerignore_patterns(repo: Path = REPO) -> list[str]:
    lines = (line.strip() for line in (repo / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def context_files(repo: Path = REPO) -> list[str]:
    """The files of the build context (relative paths, sorted): what .dockerignore lets in."""
    patterns = dockerignore_patterns(repo)
    roots = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    found = set()
    for root in roots:
        top = repo / root
        candidates = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for path in candidates:
            rel = path.relative_to(repo).as_posix()
            if dockerignore_allows(rel, patterns):
                found.add(rel)
    return sorted(found)


def content_key(parts: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, data in parts:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:20]


def image_key(target: str, base: str, repo: Path = REPO) -> str:
    """The tag of a target's image: the Dockerfile, every file of the context and the base image."""
    parts = [("target", target.encode()), ("base", base.encode()), ("Dockerfile", (repo / "Dockerfile").read_bytes())]
    parts += [(rel, (repo / rel).read_bytes()) for rel in context_files(repo)]
    return content_key(parts)


def base_recipe() -> list[tuple[str, bytes]]:
    cas = sorted(HOST_CA_DIR.rglob("*.crt")) if HOST_CA_DIR.exists() else []
    return [
        ("suite", DEBIAN_SUITE.encode()),
        ("sources", "\n".join(DEBIAN_SOURCES).encode()),
        ("packages", " ".join(BASE_PACKAGES).encode()),
        *((f"ca/{ca.name}", ca.read_bytes()) for ca in cas),
    ]


@dataclass(frozen=True)
class Image:
    target: str  # a Dockerfile target, or "pause"
    key: str

    @property
    def repository(self) -> str:
        return "kubetune/pause" if self.target == PAUSE else f"kubetune/kubetune-{self.target}"

    @property
    def ref(self) -> str:
        """What pods and the chart name."""
        return f"{REGISTRY}/{self.repository}:{self.key}"

    @property
    def local(self) -> str:
        """The name in podman's store."""
        return f"localhost/{self.repository}:{self.key}"


# ----------------------------------------------------------------------------------------------
# podman, configured for this machine
# ----------------------------------------------------------------------------------------------


def _podman_env() -> dict[str, str]:
    """podman's configuration under ROOT (written once): the store, temp files (podman otherwise writes multi-GB
    temp files to /var/tmp), host namespaces for builds (their RUN steps reach PyPI), runc and cgroupfs."""
    conf, storage = ROOT / "containers.conf", ROOT / "storage.conf"
    tmp = ROOT / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # podman lowers its own RLIMIT_NPROC to 32768, and without CAP_SYS_RESOURCE a container cannot get more than
    # its podman has: runc would fail with `error setting rlimit type 6: operation not permitted`.
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    conf.write_text(
        "[containers]\n"
        'netns = "host"\nutsns = "host"\ncgroupns = "host"\n'
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        # Raising it needs CAP_SYS_RESOURCE, which root lacks on some hosts.
        "oom_score_adj = 0\n"
        "[engine]\n"
        'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{tmp}/events.log"\n'
        f'tmp_dir = "{tmp}"\nimage_copy_tmp_dir = "{tmp}"\n'
    )
    storage.write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "/run/kubetune/containers"\ngraphroot = "{ROOT / "storage"}"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage), "TMPDIR": str(tmp)}


def podman(*args: str, capture: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], env=_podman_env(), text=True, stdout=subprocess.PIPE if capture else None, stderr=None
    )
    if check and result.returncode != 0:
        raise SystemExit(f"podman {' '.join(args[:3])} ... failed ({result.returncode})")
    return result


def has_local_image(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One builder per machine: a second one waits, then finds what the first built."""
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another build of the images runs on this machine; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------------------------
# the base image and the two targets
# ----------------------------------------------------------------------------------------------


def base_image() -> str:
    """localhost/kubetune/python-base:<key>: Debian's Python 3.11 with this host's CA certificates."""
    ref = f"{BASE_REPOSITORY}:{content_key(base_recipe())}"
    if has_local_image(ref):
        return ref
    say(f"making the Python base image {ref} from Debian packages (mmdebstrap, about a minute)")
    start = time.monotonic()
    tar = ROOT / "tmp" / "python-base.tar"
    cas = sorted(HOST_CA_DIR.rglob("*.crt")) if HOST_CA_DIR.exists() else []
    hooks = []
    if cas:
        hooks += ["--customize-hook=copy-in " + " ".join(map(str, cas)) + " /usr/local/share/ca-certificates"]
        hooks += ['--customize-hook=chroot "$1" update-ca-certificates']
    hooks += ['--customize-hook=chroot "$1" apt-get clean', '--customize-hook=rm -rf "$1"/var/lib/apt/lists/*']
    try:
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "--aptopt=APT::Install-Recommends false",
                *hooks,
                DEBIAN_SUITE,
                str(tar),
                *DEBIAN_SOURCES,
            ],
            check=True,
            env={**os.environ, "TMPDIR": str(ROOT / "tmp")},
        )
        podman("import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8", str(tar), ref)
    finally:
        tar.unlink(missing_ok=True)
    say(f"base image made in {time.monotonic() - start:.0f}s")
    return ref


def build(target: str, base: str) -> Image:
    """The target's image in podman's store, built unless its content key is there already."""
    image = Image(target, image_key(target, base))
    if has_local_image(image.local):
        return image
    say(f"building {image.local} (podman, layer cache in {ROOT / 'storage'})")
    start = time.monotonic()
    podman(
        "build",
        "--pull=never",
        "--layers",
        "--network=host",
        f"--target={target}",
        f"--build-arg=PYTHON_IMAGE={base}",
        "--label",
        f"dev.kubetune.content-key={image.key}",
        "--tag",
        image.local,
        str(REPO),
        capture=False,
    )
    say(f"built {target} in {time.monotonic() - start:.0f}s")
    return image


def build_pause(binary: Path) -> Image:
    """The pod sandbox image: the static pause binary the toolchain builds, alone on an empty image."""
    image = Image(PAUSE, content_key([("pause", binary.read_bytes())]))
    if has_local_image(image.local):
        return image
    context = ROOT / "tmp" / "pause"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    shutil.copy(binary, context / "pause")
    (context / "Containerfile").write_text('FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n')
    podman("build", "--pull=never", "--tag", image.local, str(context))
    shutil.rmtree(context)
    return image


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """A registry process (Debian's docker-registry) serving REGISTRY_STORAGE on a loopback port. Several may run
    at once (one per cluster, one per build), over the same storage."""

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        REGISTRY_STORAGE.mkdir(parents=True, exist_ok=True)
        config = self.state_dir / "registry.json"
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "warn", "accesslog": {"disabled": True}},
                    "storage": {"filesystem": {"rootdirectory": str(REGISTRY_STORAGE)}, "delete": {"enabled": True}},
                    "http": {"addr": self.address},
                }
            )
        )
        return ["docker-registry", "serve", str(config)]

    def start(self) -> Registry:
        command = self.command()
        with open(self.state_dir / "registry.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the registry on {self.address} did not answer in {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def push(self, image: Image) -> None:
        start = time.monotonic()
        # gzip, podman's default: with an explicit --compression-format (zstd would compress quicker) podman 4.3
        # no longer reuses the registry's copy of an unchanged layer and re-sends the trainer's GBs every time.
        podman(
            "push",
            "--tls-verify=false",
            "--quiet",
            image.local,
            f"{self.address}/{image.repository}:{image.key}",
            capture=False,
        )
        say(f"pushed {image.target} to the local registry in {time.monotonic() - start:.0f}s")

    def digest(self, image: Image) -> str | None:
        """The manifest digest the registry serves for the image (what a pod's status.imageID names)."""
        request = urllib.request.Request(
            f"http://{self.address}/v2/{image.repository}/manifests/{image.key}",
            method="HEAD",
            headers={
                "Accept": "application/vnd.oci.image.manifest.v1+json, "
                "application/vnd.docker.distribution.manifest.v2+json"
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError:
            return None


def push_port() -> int:
    """The same loopback port for every push (when free): podman remembers which blobs a registry has by its
    host and port, and re-sends the trainer's GBs to a registry it does not know."""
    saved = ROOT / "push-port"
    if saved.exists():
        port = int(saved.read_text())
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the registry binds it
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                pass
    port = free_port()
    saved.write_text(str(port))
    return port


def in_registry(image: Image) -> bool:
    """Whether the registry storage holds the image's tag (read from the files: no registry process needed)."""
    link = REGISTRY_STORAGE / "docker/registry/v2/repositories" / image.repository / "_manifests/tags" / image.key
    return (link / "current" / "link").exists()


# ----------------------------------------------------------------------------------------------
# pruning
# ----------------------------------------------------------------------------------------------


def _registry_layers(repository: str, tag: Path) -> list[str]:
    """The layer digests of a tag's manifest, read from the registry's storage."""
    blobs = REGISTRY_STORAGE / "docker/registry/v2/blobs/sha256"
    try:
        digest = (tag / "current" / "link").read_text().split(":", 1)[1]
        manifest = json.loads((blobs / digest[:2] / digest / "data").read_bytes())
    except (OSError, IndexError, ValueError):
        return []
    return [layer["digest"] for layer in manifest.get("layers", [])]


def prune(target: str) -> None:
    """Under the build lock: keep, of the target's image, the newest KEEP tags built on the same dependency layers
    as the newest one (all but its FINAL_LAYERS, which a code change adds), in the store and in the registry; drop
    the rest and what only they used. A dependency change thus leaves one copy of the trainer's GBs, not two."""
    image_repo = Image(target, "").repository
    listed = podman("images", "--format", "json", f"localhost/{image_repo}").stdout
    local = sorted(json.loads(listed or "[]"), key=lambda i: i.get("Created", 0), reverse=True)
    layers = {
        i["Id"]: json.loads(podman("image", "inspect", i["Id"]).stdout)[0]["RootFS"]["Layers"][:-FINAL_LAYERS]
        for i in local
    }
    kept = [i for i in local if layers[i["Id"]] == layers[local[0]["Id"]]][:KEEP] if local else []
    old = [n for i in local if i not in kept for n in i.get("Names") or [] if n.startswith(f"localhost/{image_repo}:")]
    if old:
        podman("rmi", *old, check=False)
        podman("image", "prune", "--force", check=False)
    repository = REGISTRY_STORAGE / "docker/registry/v2/repositories" / image_repo
    tags = repository / "_manifests/tags"
    if tags.exists():
        by_age = sorted(tags.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        newest = _registry_layers(image_repo, by_age[0])[:-FINAL_LAYERS]
        same = [t for t in by_age if _registry_layers(image_repo, t)[:-FINAL_LAYERS] == newest][:KEEP]
        stale = [t for t in by_age if t not in same]
        for tag in stale:
            shutil.rmtree(tag)
        # Pushes happen under the build lock, which the caller holds: any upload left is an interrupted push's.
        for upload in (repository / "_uploads").glob("*") if (repository / "_uploads").exists() else []:
            shutil.rmtree(upload, ignore_errors=True)
        if stale:
            Registry(ROOT / "registry-gc").command()  # writes the configuration the collector reads
            config = str(ROOT / "registry-gc" / "registry.json")
            subprocess.run(
                ["docker-registry", "garbage-collect", "--delete-untagged", config],
                stdout=subprocess.DEVNULL,
                check=False,
            )
    shutil.rmtree(ROOT / "tmp", ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def ensure_images(targets: tuple[str, ...] = TARGETS, *, pause: bool = False) -> dict[str, Image]:
    """This checkout's images in the registry storage: built and pushed when missing, else nothing to do.
    With `pause`, the pod sandbox image too (key "pause")."""
    with build_lock():
        base = base_image()
        wanted = {t: Image(t, image_key(t, base)) for t in targets}
        if pause:
            pause_binary = toolchain_bin() / "pause"
            wanted[PAUSE] = Image(PAUSE, content_key([("pause", pause_binary.read_bytes())]))
        missing = [image for image in wanted.values() if not in_registry(image)]
        if not missing:
            return wanted
        registry = Registry(ROOT / "registry-push", port=push_port()).start()
        try:
            for image in missing:
                if image.target == PAUSE:
                    build_pause(pause_binary)
                else:
                    build(image.target, base)
                registry.push(image)
        finally:
            registry.stop()
        for image in missing:
            prune(image.target)
        return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_dev.images", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: {' '.join(TARGETS)}")
    args = parser.parse_args(argv)
    if set(args.targets) - set(TARGETS):
        parser.error(f"targets are {', '.join(TARGETS)}")
    start = time.monotonic()
    images = ensure_images(tuple(args.targets) or TARGETS)
    for image in images.values():
        print(image.ref)
    say(f"ready in {time.monotonic() - start:.1f}s (store {ROOT / 'storage'}, registry {REGISTRY_STORAGE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
