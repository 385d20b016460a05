"""The renderer: deterministic bytes, the 16 KB limit with a sha256-pinned bundle, and
user-data that cloud-init's own schema accepts (plus the top-level keys it misses)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cloud_init.render import ALLOWED_CLOUD_CONFIG_KEYS, render_host
from offline.contexts import contexts
from tests.loadfile import load_script

ROOT = Path(__file__).resolve().parent.parent
CLOUD_INIT = "/usr/bin/cloud-init"


def all_hosts():
    for stack in ("prod", "dev"):
        for name, ctx in contexts(stack).items():
            yield stack, name, ctx


def test_rendering_is_byte_identical_across_processes(tally):
    code = ("import hashlib,json;from offline.contexts import contexts;from cloud_init.render import render_host;"
            "print(json.dumps({s + '/' + n: hashlib.sha256(render_host(c).user_data).hexdigest() "
            "for s in ('prod','dev') for n,c in contexts(s).items()}, sort_keys=True))")
    outs = []
    for seed, tz in (("1", "UTC"), ("4242", "Asia/Seoul")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TZ": tz}
        outs.append(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                   text=True, check=True).stdout)
    tally.check(len(json.loads(outs[0])) == 15)
    tally.check(outs[0] == outs[1], "user-data differs between processes")


def test_user_data_gzip_has_no_timestamp_and_fits_16kb(tally):
    for stack, name, ctx in all_hosts():
        r = render_host(ctx)
        tally.check(r.user_data[4:8] == b"\0\0\0\0", f"{stack}/{name}: gzip mtime set")
        tally.check(len(r.user_data) <= 16 * 1024, f"{stack}/{name}: {len(r.user_data)} bytes")
        tally.check(r.cloud_config_text().startswith("#cloud-config\n"))


def test_files_over_the_limit_go_to_a_pinned_bundle_that_the_host_fetches_and_checks(tally, fake_aws):
    from moto import mock_aws

    ctx = contexts("prod")["data-1"]
    full = render_host(ctx)
    small = render_host(ctx, limit=4096)
    tally.check(small.bundle is not None and small.bundle_files, "nothing moved to the bundle")
    tally.check(len(small.user_data) <= 4096)
    text = small.cloud_config_text()
    doc = yaml.safe_load(text)
    fetch = doc["runcmd"][0]
    tally.check(fetch[0] == "/usr/local/sbin/hpc-fetch-bundle" and small.bundle_sha256 in fetch, fetch)
    inline = {f["path"] for f in doc["write_files"]}
    tally.check(not inline & set(small.bundle_files), "a bundled file is also inline")
    tally.check(inline | set(small.bundle_files) >= {f.path for f in full.files})
    tally.check(render_host(ctx, limit=4096).bundle == small.bundle, "bundle bytes not deterministic")

    mod = load_script("hpc-fetch-bundle")
    with mock_aws(), tempfile.TemporaryDirectory() as root:
        import boto3

        s3 = boto3.client("s3", region_name="ap-northeast-2")
        s3.create_bucket(Bucket=ctx["bundle"]["bucket"],
                         CreateBucketConfiguration={"LocationConstraint": "ap-northeast-2"})
        s3.put_object(Bucket=ctx["bundle"]["bucket"], Key=ctx["bundle"]["key"], Body=small.bundle)
        args = ["--bucket", ctx["bundle"]["bucket"], "--key", ctx["bundle"]["key"], "--region", "ap-northeast-2",
                "--root", root]
        tally.check(mod.main(args + ["--sha256", "0" * 64]) == 4, "a wrong checksum must be refused")
        tally.check(not os.listdir(root), "nothing extracted on mismatch")
        tally.check(mod.main(args + ["--sha256", small.bundle_sha256]) == 0)
        for path in small.bundle_files:
            got = Path(root, path.lstrip("/")).read_bytes()
            tally.check(got == full.file(path).content, path)
            mode = oct(os.stat(Path(root, path.lstrip("/"))).st_mode & 0o7777)
            tally.check(int(mode, 8) == int(full.file(path).mode, 8), f"{path} mode {mode}")


def test_fetcher_refuses_archives_that_escape_the_root(tally):
    import io
    import tarfile

    mod = load_script("hpc-fetch-bundle")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../etc/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with tempfile.TemporaryDirectory() as root, pytest.raises(ValueError):
        mod.extract(buf.getvalue(), root)
    tally.check(True)


def _schema(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLOUD_INIT, "schema", "-c", path], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not os.path.exists(CLOUD_INIT), reason="cloud-init not installed (make deps)")
def test_every_hosts_user_data_passes_cloud_init_schema_and_has_only_known_keys(tally):
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for stack, name, ctx in all_hosts():
            text = gzip.decompress(render_host(ctx).user_data).decode()
            unknown = set(yaml.safe_load(text)) - ALLOWED_CLOUD_CONFIG_KEYS
            tally.check(not unknown, f"{stack}/{name}: unknown top-level keys {unknown}")
            paths[f"{stack}/{name}"] = os.path.join(tmp, f"{stack}-{name}.yaml")
            Path(paths[f"{stack}/{name}"]).write_text(text)
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(zip(paths, pool.map(_schema, paths.values()), strict=True))
        tally.check(len(results) == 15)
        for host, res in results.items():
            tally.check(res.returncode == 0 and "Valid cloud-config" in res.stdout, f"{host}: {res.stdout}{res.stderr}")


@pytest.mark.skipif(not os.path.exists(CLOUD_INIT), reason="cloud-init not installed (make deps)")
def test_schema_check_and_key_check_catch_broken_user_data(tally):
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "bad.yaml")
        Path(bad).write_text("#cloud-config\nruncmd: 5\nwrite_files:\n  - content: x\n")
        res = _schema(bad)
        tally.check(res.returncode != 0, f"schema accepted a broken document: {res.stdout}")
    doc = {"hostname": "x", "writefiles": []}
    tally.check(set(doc) - ALLOWED_CLOUD_CONFIG_KEYS == {"writefiles"})


def test_every_manifest_file_exists_and_names_its_checker(tally):
    from cloud_init.render import load_manifests
    from cloud_init.templating import SCRIPTS, TEMPLATES

    for tier, doc in load_manifests().items():
        for e in doc.get("files") or []:
            src = TEMPLATES / e["src"] if "src" in e else SCRIPTS / e["script"]
            tally.check(src.exists(), f"{tier}: {src}")
            tally.check(e.get("check"), f"{tier}: {e['dest']} names no checker")
            tally.check(e["dest"].startswith("/"), e["dest"])


def test_digest_of_rendered_files_is_in_the_stack_outputs(prod, tally):
    for name, summary in prod.outputs["rendered"].items():
        tally.check(summary["files"], name)
        for path, meta in summary["files"].items():
            tally.check(len(meta["sha256"]) == 64, path)
    tally.check(hashlib.sha256(b"").hexdigest() != "")
