"""`icsd data download | check | list` against a local HTTP server (127.0.0.1, Range support)
serving small archives of the real layout: every data set laid out where the configs look,
resumed after broken connections, refused on a damaged archive, a wrong checksum or a full disk,
never half unpacked."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import re
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from icsd import cli
from icsd.data import catalogue, fetch
from icsd.data.catalogue import DATASETS

PAPER = Path(__file__).resolve().parents[1] / "configs" / "icsd_coco.yaml"
COCO_IDS = (42, 73, 74)


class RangeServer:
    """Serves ``files`` (``/host/path`` -> bytes) with HTTP Range; ``drop_after``: close each
    response after that many body bytes (a broken connection)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drop_after: int | None = None
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = server.files.get(self.path)
                server.ranges.append(self.headers.get("Range"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if server.drop_after is not None:
                    part = part[: server.drop_after]
                self.wfile.write(part)
                if server.drop_after is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def karpathy(dataset: str) -> bytes:
    if dataset == "coco":
        images = [
            {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "imgid": n,
             "split": "test" if n < 2 else "val", "sentences": [{"raw": f"a photo number {i}."}]}
            for n, i in enumerate(COCO_IDS)
        ]  # fmt: skip
    else:
        images = [{"filename": f"{1000 + n}.jpg", "imgid": n, "split": "test", "sentences": [{"raw": "a dog."}]}
                  for n in range(2)]  # fmt: skip
    return json.dumps({"dataset": dataset, "images": images}).encode()


def nocaps() -> bytes:
    images = [{"id": n, "file_name": f"nc{n}.jpg", "coco_url": f"https://s3.amazonaws.com/nocaps/val/nc{n}.jpg",
               "domain": "in-domain"} for n in range(3)]  # fmt: skip
    anns = [{"image_id": n, "caption": "a thing.", "id": n} for n in range(3)]
    return json.dumps({"images": images, "annotations": anns}).encode()


def source_files() -> dict[str, bytes]:
    """``/host/path`` -> bytes: each catalogue URL as the mirror serves it."""
    files = {
        "/images.cocodataset.org/zips/val2014.zip": zip_bytes(
            {f"val2014/COCO_val2014_{i:012d}.jpg": jpeg(i) for i in COCO_IDS}),
        "/images.cocodataset.org/zips/train2014.zip": zip_bytes(
            {f"train2014/COCO_train2014_{i:012d}.jpg": jpeg(i) for i in (9, 25)}),
        "/images.cocodataset.org/annotations/annotations_trainval2017.zip": zip_bytes({
            "annotations/captions_train2017.json": b'{"images": [], "annotations": []}',
            "annotations/captions_val2017.json": b'{"images": [], "annotations": []}',
            "annotations/instances_val2017.json": b"{}",
        }),
        "/cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip": zip_bytes({
            "dataset_coco.json": karpathy("coco"), "dataset_flickr30k.json": karpathy("flickr30k"),
            "dataset_flickr8k.json": karpathy("flickr8k"),
        }),
        "/nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json": nocaps(),
    }  # fmt: skip
    files.update({f"/s3.amazonaws.com/nocaps/val/nc{n}.jpg": jpeg(n) for n in range(3)})
    return files


def small_catalogue(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    """The real catalogue, with the published sizes/checksums and image counts of these small files."""
    for name, d in list(DATASETS.items()):
        sources = tuple(
            dataclasses.replace(s, size=len(files[path]), sha256=hashlib.sha256(files[path]).hexdigest())
            if s.sha256 else s
            for s in d.sources
            for path in ["/" + s.url.split("://", 1)[1]]
        )  # fmt: skip
        counts = {"coco/val2014": 3, "coco/train2014": 2, "nocaps/validation": 3, "flickr30k/images": 2}
        targets = tuple(dataclasses.replace(t, images=counts.get(t.path, t.images)) for t in d.targets)
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(d, sources=sources, targets=targets))


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[RangeServer]:
    files = source_files()
    small_catalogue(monkeypatch, files)
    with RangeServer(files) as srv:
        monkeypatch.setenv(catalogue.MIRROR_ENV, srv.url)
        yield srv


def icsd(*args: str) -> tuple[int, str]:
    """Run the CLI as the console script does (one-line errors and exit codes of ``main``)."""
    out = io.StringIO()
    argv, stdout, stderr = sys.argv, sys.stdout, sys.stderr
    sys.argv, sys.stdout, sys.stderr = ["icsd", *args], out, out
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv, sys.stdout, sys.stderr = argv, stdout, stderr
    return code, out.getvalue()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".staging" in p.parts or p.suffix == ".part")


def test_every_data_set_lands_where_the_configs_look(tmp_path: Path, server: RangeServer) -> None:
    root = tmp_path / "data"
    code, out = icsd("data", "download", "coco", "coco2017-captions", "nocaps", "--root", str(root))
    assert code == 0, out
    for rel in ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json",
                "coco/val2014/COCO_val2014_000000000042.jpg", "coco/train2014/COCO_train2014_000000000009.jpg",
                "coco/annotations/captions_train2017.json", "coco/annotations/captions_val2017.json",
                "nocaps_val_4500_captions.json", "nocaps/validation/nc2.jpg"):  # fmt: skip
        assert (root / rel).is_file(), rel
    assert not (root / "coco/annotations/instances_val2017.json").exists()
    assert not (root / "downloads").exists() and not leftovers(root)
    record = json.loads((root / ".icsd-data.json").read_text())
    val = record["coco-val2014"]["files"][0]
    assert val["checksum"].startswith("published") and len(val["sha256"]) == 64
    assert record["karpathy-splits"]["files"][0]["checksum"] == "recorded at download"
    assert set(record["nocaps-val-images"]["sha256"]) == {"nc0.jpg", "nc1.jpg", "nc2.jpg"}
    assert "6 downloaded" in out and "kB fetched" in out

    requests = len(server.ranges)
    code, out = icsd("data", "download", "coco", "--root", str(root))
    assert code == 0 and "3 already in place" in out and len(server.ranges) == requests

    # the paper's config, its data/ paths pointed at this root: everything in place
    config = tmp_path / "paper.yaml"
    config.write_text(PAPER.read_text().replace("data/", f"{root}/"))
    code, out = icsd("data", "check", str(config))
    assert code == 0, out
    assert "5 paths needed, 5 in place, 0 missing" in out

    # an image the test split needs goes missing; the annotation file gets damaged
    (root / "coco/val2014/COCO_val2014_000000000073.jpg").unlink()
    code, out = icsd("data", "check", str(config))
    assert code == 1
    assert re.search(r"evaluate\.images .* incomplete \(1 of 2 images of coco-karpathy-test missing", out), out
    assert re.search(r"train\.val_images .* incomplete \(2 of 3 images\)", out), out
    (root / "dataset_coco.json").write_text('{"images": [')
    code, out = icsd("data", "check", str(config))
    assert re.search(r"ingest\.corpus .* corrupt \(SHA-256 differs", out), out
    assert "get them: icsd data download karpathy-splits coco-val2014" in out


def test_a_request_form_source_says_how_and_unpacks_a_placed_archive(tmp_path: Path, server: RangeServer) -> None:
    root = tmp_path / "data"
    code, out = icsd("data", "download", "flickr30k-images", "--root", str(root))
    assert code == 1
    assert "shannon.cs.illinois.edu" in out and f"{root}/downloads/" in out
    assert error_lines(out)[-1].startswith("error: flickr30k-images must be fetched by hand")
    buf = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n in range(2):
            data = jpeg(n)
            info = tarfile.TarInfo(f"flickr30k-images/{1000 + n}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "flickr30k-images.tar.gz").write_bytes(buf.getvalue())
    code, out = icsd("data", "download", "flickr30k-images", "--root", str(root))
    assert code == 0, out
    assert sorted(p.name for p in (root / "flickr30k/images").iterdir()) == ["1000.jpg", "1001.jpg"]


def test_a_broken_connection_resumes_with_range(tmp_path: Path, server: RangeServer) -> None:
    root = tmp_path / "data"
    body = server.files["/images.cocodataset.org/zips/val2014.zip"]
    server.drop_after = 1000
    assert len(body) > 1000
    code, out = icsd("data", "download", "coco-val2014", "--root", str(root), "--retries", "0")
    assert code == 1
    assert len(error_lines(out)) == 1 and "run the same command again to resume" in out, out
    assert (root / "downloads" / "val2014.zip.part").stat().st_size == 1000
    assert not (root / "coco").exists()

    # the same command, the connection still breaking every 1000 bytes: resumed to the end
    code, out = icsd("data", "download", "coco-val2014", "--root", str(root), "--retries", "50")
    assert code == 0, out
    assert server.ranges == [None] + [f"bytes={k}-" for k in range(1000, len(body), 1000)]
    assert len(list((root / "coco/val2014").iterdir())) == 3 and not leftovers(root)


def test_a_damaged_archive_is_removed_and_nothing_half_unpacked(tmp_path: Path, server: RangeServer) -> None:
    root = tmp_path / "data"
    key = "/cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
    good = server.files[key]
    broken = bytearray(good)
    at = good.index(b"dataset_flickr30k.json") + 200  # inside a member's compressed data
    broken[at] ^= 0xFF
    server.files[key] = bytes(broken)
    code, out = icsd("data", "download", "karpathy-splits", "--root", str(root))
    assert code == 1
    assert len(error_lines(out)) == 1 and "is damaged" in out, out
    assert not any((root / n).exists() for n in ("dataset_coco.json", "dataset_flickr30k.json"))
    assert not (root / "downloads" / "caption_datasets.zip").exists() and not leftovers(root)

    server.files[key] = good
    code, out = icsd("data", "download", "karpathy-splits", "--root", str(root))
    assert code == 0 and (root / "dataset_flickr30k.json").is_file()


def test_a_wrong_checksum_is_refused(tmp_path: Path, server: RangeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    d = DATASETS["coco2017-captions"]
    monkeypatch.setitem(DATASETS, d.name, dataclasses.replace(
        d, sources=(dataclasses.replace(d.sources[0], sha256="0" * 64),)))  # fmt: skip
    code, out = icsd("data", "download", "coco2017-captions", "--root", str(root))
    assert code == 1
    assert "does not match the published" in error_lines(out)[0], out
    assert not (root / "coco").exists() and not list((root / "downloads").glob("*")) if (root / "downloads").exists() else True


def test_a_full_disk_stops_cleanly_and_the_same_command_finishes(
    tmp_path: Path, server: RangeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    written = {"n": 0}
    real_write = fetch.write_chunk

    def full_after(limit: int):
        def write(fh, chunk: bytes) -> None:
            if written["n"] + len(chunk) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            written["n"] += len(chunk)
            real_write(fh, chunk)

        return write

    server.drop_after = 500  # small responses: the disk fills between two of them
    monkeypatch.setattr(fetch, "write_chunk", full_after(1500))
    code, out = icsd("data", "download", "coco-val2014", "--root", str(root), "--retries", "50")
    assert code == 1
    assert error_lines(out) == [error_lines(out)[0]] and "No space left on device" in out, out
    assert (root / "downloads" / "val2014.zip.part").stat().st_size == 1500

    # space while downloading, none while unpacking: the archive stays, nothing half unpacked
    written["n"] = 0
    monkeypatch.setattr(fetch, "write_chunk", full_after(len(server.files["/images.cocodataset.org/zips/val2014.zip"])))
    code, out = icsd("data", "download", "coco-val2014", "--root", str(root), "--retries", "50")
    assert code == 1 and "No space left on device" in out, out
    assert (root / "downloads" / "val2014.zip").is_file()
    assert not (root / "coco").exists() and not leftovers(root)

    monkeypatch.setattr(fetch, "write_chunk", real_write)
    requests = len(server.ranges)
    code, out = icsd("data", "download", "coco-val2014", "--root", str(root))
    assert code == 0, out
    assert len(server.ranges) == requests  # unpacked from the archive already there
    assert len(list((root / "coco/val2014").iterdir())) == 3


def test_check_on_an_empty_machine_lists_the_exact_missing_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["data", "check", str(PAPER)])
    assert result.exit_code == 1
    rows = {tuple(line.split()[:3]) for line in result.output.splitlines()}
    assert rows >= {
        ("ingest.corpus", "data/dataset_coco.json", "missing"),
        ("train.val_images", "data/coco/val2014", "missing"),
        ("train.val_captions", "data/dataset_coco.json", "missing"),
        ("evaluate.annotations", "data/dataset_coco.json", "missing"),
        ("evaluate.images", "data/coco", "missing"),
    }
    assert "get them: icsd data download karpathy-splits coco-val2014\n" in result.output


def test_list_and_bad_names() -> None:
    result = CliRunner().invoke(cli.app, ["data", "list"])
    assert result.exit_code == 0
    for name in DATASETS:
        assert f"{name}  [" in result.output
    assert "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0" not in result.output
    code, out = icsd("data", "download", "coco-val2041")
    assert code == 2 and error_lines(out) == ["error: unknown data set 'coco-val2041' (did you mean 'coco-val2014'?); see icsd data list"]
