"""`make images` tags each image with a key over what its build reads, so every checkout runs its own code on the
real nodes and an unchanged checkout builds nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from kubetune_dev import images

REPO = Path(__file__).resolve().parents[2]


def checkout(tmp: Path) -> Path:
    """A checkout with the files the key reads, and some it must not."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, tmp / name)
    for rel in ("operator/kubetune_operator/render.py", "trainer/kubetune_trainer/loop.py", "tests/test_x.py"):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(f"# {rel}\n")
    (tmp / "operator/kubetune_operator/__pycache__").mkdir()
    (tmp / "operator/kubetune_operator/__pycache__/render.cpython-311.pyc").write_bytes(b"\0")
    (tmp / ".cache").mkdir()
    (tmp / ".cache/state.json").write_text("{}")
    return tmp


def test_the_context_is_what_dockerignore_lets_in(tmp_path: Path) -> None:
    repo = checkout(tmp_path)
    assert images.context_files(repo) == [
        "README.md",
        "constraints.txt",
        "operator/kubetune_operator/render.py",
        "pyproject.toml",
        "trainer/kubetune_trainer/loop.py",
    ]


def test_the_key_follows_the_code_the_dockerfile_and_the_base_only(tmp_path: Path) -> None:
    repo = checkout(tmp_path)
    key = images.image_key("trainer", "base:1", repo)
    assert key == images.image_key("trainer", "base:1", repo)  # nothing changed: the same tag, nothing to build
    (repo / "tests/test_x.py").write_text("# changed\n")
    (repo / ".cache/state.json").write_text('{"a": 1}')
    (repo / "operator/kubetune_operator/__pycache__/render.cpython-311.pyc").write_bytes(b"\1")
    assert images.image_key("trainer", "base:1", repo) == key
    assert images.image_key("operator", "base:1", repo) != key
    assert images.image_key("trainer", "base:2", repo) != key

    (repo / "trainer/kubetune_trainer/loop.py").write_text("# a fix\n")
    changed = images.image_key("trainer", "base:1", repo)
    assert changed != key
    (repo / "Dockerfile").write_text((repo / "Dockerfile").read_text() + "\n# a comment\n")
    assert images.image_key("trainer", "base:1", repo) != changed


def test_pods_name_the_images_by_the_local_registry_host() -> None:
    image = images.Image("trainer", "0123abcd")
    assert image.ref == "kubetune.local/kubetune/kubetune-trainer:0123abcd"
    assert image.local == "localhost/kubetune/kubetune-trainer:0123abcd"
    assert images.Image(images.PAUSE, "k").ref == "kubetune.local/kubetune/pause:k"
