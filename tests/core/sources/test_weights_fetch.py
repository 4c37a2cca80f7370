"""`mammo weights fetch` and mammo_core.sources.weights_fetch against a real local HTTP server (127.0.0.1, a thread).

The server speaks HTTP Range like download.pytorch.org, records every request's Range header, and can cut a
response short to simulate a dropped connection.
"""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from flows.cli import app
from mammo_core.sources import weight_sources, weights_fetch

PAYLOAD = bytes(range(256)) * 400  # 100 kB
SHA = hashlib.sha256(PAYLOAD).hexdigest()
GOOD = f"tiny-{SHA[:8]}.pth"  # the name promises the payload's hash prefix
BAD = "tiny-deadbeef.pth"  # same bytes, a name whose prefix the payload does not have


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.ranges, self.cut_after = files, [], None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = server.files.get(self.path.lstrip("/"))
                server.ranges.append(self.headers.get("Range"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:] if server.cut_after is None else body[start:start + server.cut_after]
                self.wfile.write(chunk)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with _Server({GOOD: PAYLOAD, BAD: PAYLOAD}) as s:
        yield s


def test_a_file_matching_its_name_hash_is_downloaded_atomically(server, tmp_path):
    target = tmp_path / "checkpoints" / GOOD
    assert weights_fetch.download(f"{server.url}/{GOOD}", target) == "downloaded"
    assert target.read_bytes() == PAYLOAD
    assert list(target.parent.iterdir()) == [target]  # no partial file left
    assert server.ranges == [None]


def test_a_file_not_matching_its_name_hash_is_refused_and_removed(server, tmp_path):
    target = tmp_path / "checkpoints" / BAD
    with pytest.raises(weights_fetch.HashMismatch, match=f"sha256 {SHA} does not start with 'deadbeef'"):
        weights_fetch.download(f"{server.url}/{BAD}", target)
    assert list(target.parent.iterdir()) == []  # neither the file nor its partial


def test_an_interrupted_download_resumes_from_its_partial_file(server, tmp_path):
    target = tmp_path / "checkpoints" / GOOD
    server.cut_after = 30_000  # the connection drops after 30 kB
    with pytest.raises(OSError):  # http.client.IncompleteRead: fewer bytes than Content-Length
        weights_fetch.download(f"{server.url}/{GOOD}", target)
    partial = target.with_name(GOOD + ".partial")
    assert partial.stat().st_size == 30_000 and not target.exists()
    server.cut_after = None
    assert weights_fetch.download(f"{server.url}/{GOOD}", target) == "resumed"
    assert server.ranges == [None, "bytes=30000-"]  # only the rest was asked for
    assert target.read_bytes() == PAYLOAD and not partial.exists()


def test_names_without_a_hash_prefix_are_refused():
    with pytest.raises(ValueError, match="no hash prefix"):
        weights_fetch.hash_prefix_of("weights.pth")
    assert weights_fetch.hash_prefix_of("densenet121-a639ec97.pth") == "a639ec97"


def test_cli_refuses_a_served_file_whose_hash_does_not_match_torchvisions_name(tmp_path, monkeypatch):
    """`mammo weights fetch densenet121 --base-url` asks for torchvision's file name; bytes that do not hash
    to its prefix never reach the cache. A verified file already there is kept without a request."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = "densenet121-a639ec97.pth"
    with _Server({name: PAYLOAD}) as s:
        result = CliRunner().invoke(app, ["weights", "fetch", "densenet121", "--base-url", s.url])
        assert result.exit_code == 1, result.output
        output = " ".join(result.output.split())
        assert "refused densenet121" in output and "a639ec97" in output
        assert s.ranges == [None]
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert not (cache / name).exists() and not (cache / (name + ".partial")).exists()
    result = CliRunner().invoke(app, ["weights", "fetch", "resnet9000"])
    assert result.exit_code == 2 and "unknown weights resnet9000" in " ".join(result.output.split())


def test_fetch_keeps_a_verified_cached_file_and_refuses_a_corrupt_one(tmp_path, monkeypatch):
    monkeypatch.setenv(weights_fetch.BASE_URL_ENV, "http://127.0.0.1:9")  # nothing listens: no request may be made
    name = weights_fetch.torchvision_urls()["vgg16"].rsplit("/", 1)[1]
    (tmp_path / name).write_bytes(b"not the vgg16 weights")
    with pytest.raises(weights_fetch.HashMismatch, match=name):
        weights_fetch.fetch("vgg16", cache=tmp_path)
    assert (tmp_path / name).read_bytes() == b"not the vgg16 weights"  # the user's file is not touched
    assert weights_fetch.source_url("vgg16") == f"http://127.0.0.1:9/{name}"
    os.remove(tmp_path / name)
    with pytest.raises(OSError):  # connection refused: the env override was used, not download.pytorch.org
        weights_fetch.fetch("vgg16", cache=tmp_path)


def test_the_command_fills_exactly_the_files_the_stages_read_and_stages_never_download(tmp_path, monkeypatch):
    """Every name's destination is the path its loader reads; with the cache empty and every download
    function failing, the stages' loaders say where the file goes and name the command, without a request."""
    import urllib.request

    from mammo_core.baselines import networks
    from mammo_core.models import fused as model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = weights_fetch.checkpoints_dir()
    assert cache == tmp_path / "torch" / "hub" / "checkpoints"
    files = {n: cache / u.rsplit("/", 1)[1] for n, u in weights_fetch.torchvision_urls().items()}
    assert files["densenet121"] == model.imagenet_weights_path()
    for network in ("resnet50", "vgg16", "inception_v3", "densenet121"):
        assert files[network] == networks.imagenet_file(network)
    assert files["frcnn_r50"] == weight_sources.r50_detector_file("coco")
    assert files["resnet50"] == weight_sources.r50_detector_file("imagenet")

    def no_network(*args, **kwargs):
        raise AssertionError("a stage tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr("torch.hub.download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError, match="mammo weights fetch densenet121"):
        model.load_backbone_weights("imagenet")
    net = networks.SingleNetClassifier("resnet50", 3, input_size=64, weights="imagenet")
    assert net.weights_tag == networks.RANDOM_INIT_TAG  # absent file: random init, said so, no download
