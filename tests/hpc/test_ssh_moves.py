"""Copying a site's update back over SSH (rsync through a real sshd on localhost), when the site is hostile or
broken: only what its manifest lists comes, within a size limit; links and unlisted files stay on the site; a
manifest whose files do not come is refused by the usual checks, naming the file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedfleet.core.params import FlatParams
from fedfleet.hpc.sites import Site
from fedfleet.hpc.sites.ssh import SshTarget
from fedfleet.runtime.files.exchange import MANIFEST, Refused, publish, verify
from tests.ssh_server import SshServer, serve

EXPECT = {"session": "s", "party": "site-b", "round": 1, "kind": "update"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    yield from serve(tmp_path_factory.mktemp("sshd"))


@pytest.fixture
def target(server: SshServer, tmp_path: Path) -> Iterator[SshTarget]:
    site = Site("site-b", reach=server.reach, remote_dir=str(tmp_path / "remote"), ssh_key=str(server.key),
                ssh_options=tuple(server.options))  # fmt: skip
    found = SshTarget.of(site)
    try:
        yield found
    finally:
        found.close()
    assert not os.path.exists(found.control_dir)  # its socket's folder goes with it


def params() -> FlatParams:
    return FlatParams.from_tensors({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)})


def test_only_the_listed_files_come_back_and_links_and_extras_stay(target: SshTarget, tmp_path: Path):
    remote = tmp_path / "remote" / "update"
    publish(remote, params(), dict(EXPECT))
    (remote / "extra.bin").write_bytes(os.urandom(1 << 20))  # not listed: stays there
    (remote / "hostname").symlink_to("/etc/hostname")  # a link to a file of the copying machine
    staging, here = tmp_path / "staging", tmp_path / "here"
    assert target.pull_published(str(remote), staging, here, max_bytes=1 << 16)
    assert sorted(p.name for p in here.iterdir()) == [MANIFEST, "params.safetensors"]
    found = verify(here / MANIFEST, EXPECT, params().spec)
    assert found is not None and found.params.allclose(params(), rtol=0, atol=0)


def test_an_update_over_the_limit_is_not_copied_and_then_refused_naming_its_file(target: SshTarget, tmp_path: Path):
    remote = tmp_path / "remote" / "update"
    publish(remote, params(), dict(EXPECT))
    body = json.loads((remote / MANIFEST).read_text())
    body["files"]["params.safetensors"]["bytes"] = 10 << 30  # claims 10 GB
    (remote / MANIFEST).write_text(json.dumps(body))
    here = tmp_path / "here"
    assert target.pull_published(str(remote), tmp_path / "staging", here, max_bytes=1 << 16)
    assert sorted(p.name for p in here.iterdir()) == [MANIFEST]
    with pytest.raises(Refused, match=r"params\.safetensors"):
        verify(here / MANIFEST, EXPECT, params().spec)


def test_nothing_comes_before_the_site_has_a_manifest(target: SshTarget, tmp_path: Path):
    remote = tmp_path / "remote" / "update"
    remote.mkdir(parents=True)
    (remote / "params.safetensors").write_bytes(b"half-written")
    here = tmp_path / "here"
    assert not target.pull_published(str(remote), tmp_path / "staging", here, max_bytes=1 << 16)
    assert not here.exists()


def test_a_manifest_or_data_file_that_is_a_folder_on_the_site_brings_nothing_of_it(target: SshTarget, tmp_path: Path):
    remote = tmp_path / "remote" / "update"
    publish(remote, params(), dict(EXPECT))
    (remote / "params.safetensors").unlink()
    (remote / "params.safetensors").mkdir()  # listed by the manifest, but a folder with files in it
    for i in range(50):
        (remote / "params.safetensors" / f"f{i}").write_bytes(b"x" * 100)
    here = tmp_path / "here"
    assert target.pull_published(str(remote), tmp_path / "staging", here, max_bytes=1 << 16)
    assert sorted(p.name for p in here.iterdir()) == [MANIFEST]  # the folder stayed on the site
    with pytest.raises(Refused, match=r"params\.safetensors"):
        verify(here / MANIFEST, EXPECT, params().spec)


def test_a_listed_file_missing_on_the_site_is_refused_by_name_not_a_crash(target: SshTarget, tmp_path: Path):
    remote = tmp_path / "remote" / "update"
    publish(remote, params(), dict(EXPECT))
    (remote / "params.safetensors").unlink()  # the manifest lists it, the site lost it
    here = tmp_path / "here"
    assert target.pull_published(str(remote), tmp_path / "staging", here, max_bytes=1 << 16)
    with pytest.raises(Refused, match=r"params\.safetensors"):
        verify(here / MANIFEST, EXPECT, params().spec)
