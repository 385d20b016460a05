"""Render one host's user-data (and, when it does not fit, its bundle) from plain values.

Every tier keeps a `templates/<tier>/manifest.yaml` listing its files (a Jinja2 template
or a verbatim host script), the packages it needs and the commands cloud-init runs. For a
host, `render_host(ctx)` takes what matches its roles and returns:

- the files, exactly as they land on the host (the checkers and the rehearsal read these);
- `user_data`: a gzipped `#cloud-config` (EC2 takes at most 16 KB), byte-identical for the
  same context: no MIME boundary, no timestamps, everything sorted;
- `bundle`: when the files do not fit in 16 KB, the largest ones go into a tar.gz that
  the program uploads to the stack's bundle bucket; its sha256 is pinned in the user-data
  and checked by `hpc-fetch-bundle` at boot before anything is extracted.

No Pulumi here: components call it from `Output.all(...).apply(...)`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .templating import _ENV, SCRIPTS, TEMPLATES, render_template

USER_DATA_LIMIT = 16 * 1024  # EC2's limit on raw user-data (here: the gzip bytes)
BUNDLE_FETCHER = "/usr/local/sbin/hpc-fetch-bundle"
ALLOWED_CLOUD_CONFIG_KEYS = {
    "hostname", "fqdn", "prefer_fqdn_over_hostname", "manage_etc_hosts", "timezone",
    "ntp", "package_update", "package_upgrade", "packages", "write_files", "runcmd",
    "apt", "bootcmd", "mounts", "users", "disk_setup", "fs_setup",
}


@dataclass(frozen=True)
class HostFile:
    path: str
    content: bytes
    mode: str
    owner: str
    tier: str
    check: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class RenderedHost:
    name: str
    files: list[HostFile]
    packages: list[str]
    commands: list[list[str]]
    cloud_config: dict[str, Any]
    user_data: bytes  # gzip of the #cloud-config text
    bundle: bytes | None = None
    bundle_files: list[str] = field(default_factory=list)

    @property
    def bundle_sha256(self) -> str | None:
        return hashlib.sha256(self.bundle).hexdigest() if self.bundle is not None else None

    def file(self, path: str) -> HostFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"{self.name} has no file {path}")

    def cloud_config_text(self) -> str:
        return gzip.decompress(self.user_data).decode()


@functools.lru_cache(maxsize=8)
def load_manifests(root: Path = TEMPLATES) -> dict[str, dict[str, Any]]:
    """Every tier's manifest (read once per process; callers must not modify it)."""
    out: dict[str, dict[str, Any]] = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for m in sorted(root.glob("*/manifest.yaml")):
        doc = yaml.load(m.read_text(), Loader=loader) or {}
        unknown = set(doc) - {"files", "commands", "packages", "cloud_config"}
        if unknown:
            raise ValueError(f"{m}: unknown manifest keys {sorted(unknown)}")
        out[m.parent.name] = doc
    return out


# Manifests' conditions and command arguments are compiled once per process, not once per
# host: Jinja compiles every string it is given anew.
@functools.lru_cache(maxsize=512)
def _condition(cond: str) -> Any:
    return _ENV.compile_expression(cond, undefined_to_none=False)


@functools.lru_cache(maxsize=512)
def _argument(text: str) -> jinja2.Template:
    return _ENV.from_string(text)


def _script(name: str) -> bytes:
    """A host script's bytes, read once per process while the file stays the same."""
    path = SCRIPTS / name
    st = path.stat()
    return _script_bytes(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _script_bytes(path: Path, mtime_ns: int, size: int) -> bytes:
    return path.read_bytes()


def _applies(entry: dict[str, Any], roles: list[str], ctx: dict[str, Any], where: str) -> bool:
    want = entry.get("roles", ["all"])
    if want != ["all"] and want != "all" and not set(want) & set(roles):
        return False
    cond = entry.get("when")
    if cond:
        try:
            return bool(_condition(cond)(**ctx))
        except jinja2.UndefinedError as e:
            raise ValueError(f"{where}: condition {cond!r}: {e}") from e
    return True


def _deterministic_gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


@functools.lru_cache(maxsize=1024)
def _gzip_size(content: bytes) -> int:
    """The size of one file's deterministic gzip (hosts of a tier share most files)."""
    return len(_deterministic_gzip(content))


def _tar(files: list[HostFile]) -> bytes:
    # Hosts of the same roles bundle the same scripts: one archive for all of them.
    return _tar_members(tuple((f.path, f.content, f.mode, f.owner) for f in sorted(files, key=lambda f: f.path)))


@functools.lru_cache(maxsize=64)
def _tar_members(members: tuple[tuple[str, bytes, str, str], ...]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content, mode, owner in members:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size = len(content)
            info.mode = int(mode, 8)
            info.mtime = 0
            user, _, group = owner.partition(":")
            info.uname, info.gname = user, group or user
            info.uid = info.gid = 0
            tar.addfile(info, io.BytesIO(content))
    return _deterministic_gzip(raw.getvalue())


def empty_bundle() -> bytes:
    """The bundle of a host that has nothing in it: the same deterministic tar.gz format
    `render_host` uses, with no members (for callers that need a bundle object per host)."""
    return _tar([])


def _write_file_entry(f: HostFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": f.path, "permissions": f.mode, "owner": f.owner}
    try:
        entry["content"] = f.content.decode()
    except UnicodeDecodeError:
        import base64

        entry["encoding"] = "b64"
        entry["content"] = base64.b64encode(f.content).decode()
    # Files owned by a daemon's user are written after the packages created that user.
    entry["defer"] = True
    return entry


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def _cloud_config(rh_files: list[HostFile], packages: list[str], commands: list[list[str]],
                  extra: dict[str, Any], ctx: dict[str, Any], bundle_sha: str | None) -> str:
    host = ctx["host"]
    doc: dict[str, Any] = {
        "hostname": host["name"],
        "fqdn": host["fqdn"],
        "prefer_fqdn_over_hostname": False,
        "manage_etc_hosts": False,
        "package_update": True,
        "package_upgrade": False,
    }
    for k, v in sorted(extra.items()):
        doc[k] = v
    if packages:
        doc["packages"] = packages
    doc["write_files"] = [_write_file_entry(f) for f in rh_files]
    runcmd: list[list[str]] = []
    if bundle_sha is not None:
        b = ctx["bundle"]
        runcmd.append([BUNDLE_FETCHER, "--bucket", b["bucket"], "--key", b["key"],
                       "--sha256", bundle_sha, "--region", ctx["region"]])
    runcmd.extend(commands)
    if runcmd:
        doc["runcmd"] = runcmd
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=1000)
    return "#cloud-config\n" + text


_CACHE: dict[tuple[str, str, int], RenderedHost] = {}


def render_host(ctx: dict[str, Any], manifests: dict[str, dict[str, Any]] | None = None,
                limit: int = USER_DATA_LIMIT, *, key: str | None = None) -> RenderedHost:
    """Render every file of one host and pack its user-data (see the module docstring).

    Pure, so results are memoized by the context's canonical JSON (the program renders the
    same hosts again in every run of the tests). A caller that can name the context's
    content more cheaply passes it as `key` (components.hostctx.render_hosts: the digest
    of the stack's part and the JSON of the host's own); equal keys must mean equal
    contexts."""
    if manifests is not None:
        return _render_host(ctx, manifests, limit)
    memo = ("key" if key is not None else "json", key if key is not None else json.dumps(ctx, sort_keys=True), limit)
    if memo not in _CACHE:
        _CACHE[memo] = _render_host(ctx, load_manifests(), limit)
    return _CACHE[memo]


def _render_host(ctx: dict[str, Any], manifests: dict[str, dict[str, Any]], limit: int) -> RenderedHost:
    roles = list(ctx["host"]["roles"])
    files: dict[str, HostFile] = {}
    packages: set[str] = set()
    commands: list[tuple[int, str, int, list[str]]] = []
    extra: dict[str, Any] = {}
    for tier, doc in sorted(manifests.items()):
        for i, e in enumerate(doc.get("files") or []):
            where = f"templates/{tier}/manifest.yaml files[{i}]"
            if not _applies(e, roles, ctx, where):
                continue
            if "src" in e:
                content = render_template(e["src"], ctx).encode()
                source = f"templates/{e['src']}"
            else:
                content = _script(e["script"])
                source = f"scripts/{e['script']}"
            dest = e["dest"]
            if dest in files:
                raise ValueError(f"{where}: {dest} is also written by {files[dest].source}")
            files[dest] = HostFile(dest, content, str(e.get("mode", "0644")), e.get("owner", "root:root"),
                                   tier, e.get("check", ""), source)
        for i, e in enumerate(doc.get("packages") or []):
            if _applies(e, roles, ctx, f"templates/{tier}/manifest.yaml packages[{i}]"):
                packages.update(e["names"])
        for i, e in enumerate(doc.get("commands") or []):
            if _applies(e, roles, ctx, f"templates/{tier}/manifest.yaml commands[{i}]"):
                run = e["run"]
                argv = [str(x) for x in run] if isinstance(run, list) else ["sh", "-c", str(run)]
                # arguments may name context values: "{{ host.data_volume.size_gb }}"
                argv = [_argument(a).render(**ctx) if "{{" in a else a for a in argv]
                commands.append((int(e.get("order", 50)), tier, i, argv))
        for k, v in (doc.get("cloud_config") or {}).items():
            if k not in ALLOWED_CLOUD_CONFIG_KEYS:
                raise ValueError(f"templates/{tier}/manifest.yaml cloud_config: unknown key {k}")
            if k == "apt" and "apt" in extra:
                extra["apt"].setdefault("sources", {}).update(v.get("sources", {}))
                continue
            if k in extra and extra[k] != v:
                raise ValueError(f"templates/{tier}/manifest.yaml cloud_config.{k} conflicts with another tier")
            if k == "apt" and not _applies({"roles": v.get("roles", ["all"])}, roles, ctx, tier):
                continue
            extra[k] = {kk: vv for kk, vv in v.items() if kk != "roles"} if k == "apt" else v
    ordered_files = [files[k] for k in sorted(files)]
    ordered_cmds = [c[3] for c in sorted(commands, key=lambda c: (c[0], c[1], c[2]))]
    pkgs = sorted(packages)

    inline = list(ordered_files)
    bundled: list[HostFile] = []
    bundle: bytes | None = None
    while True:
        sha = hashlib.sha256(bundle).hexdigest() if bundle is not None else None
        text = _cloud_config(inline, pkgs, ordered_cmds, extra, ctx, sha)
        user_data = _deterministic_gzip(text.encode())
        if len(user_data) <= limit:
            break
        movable = [f for f in inline if f.path != BUNDLE_FETCHER]
        if not movable:
            raise ValueError(f"{ctx['host']['name']}: user-data is {len(user_data)} bytes even with every "
                             f"file in the bundle (limit {limit})")
        # Move the largest files until their compressed sizes cover the excess (plus a
        # margin for the fetcher and YAML), then measure again.
        excess = len(user_data) - int(limit * 0.92)
        for f in sorted(movable, key=lambda f: (-len(f.content), f.path)):
            inline.remove(f)
            bundled.append(f)
            excess -= _gzip_size(f.content)
            if excess <= 0:
                break
        if not any(f.path == BUNDLE_FETCHER for f in inline) and (SCRIPTS / "hpc-fetch-bundle").exists():
            inline.append(HostFile(BUNDLE_FETCHER, _script("hpc-fetch-bundle"), "0755",
                                   "root:root", "render", "python-tests", "scripts/hpc-fetch-bundle"))
            inline.sort(key=lambda f: f.path)
        bundle = _tar(bundled)
    return RenderedHost(ctx["host"]["name"], ordered_files, pkgs, ordered_cmds, extra, user_data,
                        bundle, sorted(f.path for f in bundled))


def environment_file(ctx: dict[str, Any]) -> str:
    """The exact bytes of /etc/hpc/portal.env for this host (also a stack output)."""
    return render_template("app/portal.env", ctx)


def render_summary(r: RenderedHost) -> dict[str, Any]:
    """A JSON-friendly digest of a rendered host (used by the offline plan)."""
    return {
        "user_data_bytes": len(r.user_data),
        "user_data_sha256": hashlib.sha256(r.user_data).hexdigest(),
        "bundle_sha256": r.bundle_sha256,
        "bundle_files": r.bundle_files,
        "files": {f.path: {"sha256": f.sha256, "mode": f.mode, "owner": f.owner, "check": f.check}
                  for f in r.files},
        "packages": r.packages,
        "commands": [json.dumps(c) for c in r.commands],
    }
