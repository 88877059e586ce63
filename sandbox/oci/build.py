"""The image builder: images/<name>/ (a Dockerfile subset) -> a standard OCI image in the store.

Every instruction is a step whose cache key is sha256(parent key, canonical instruction text,
content hash of its inputs): COPY hashes its sources, FROM the base image's manifest digest,
RUN the build args it sees. Steps that add a layer (DEBIAN, COPY, RUN) keep an entry in
images_dir/build-cache/<key>.json naming their blob and diff_id, so changing one instruction
rebuilds it and the steps after it only. Config-only steps (ENV, WORKDIR, USER, CMD, ...) add
an empty-layer history entry.

RUN executes inside an sbx container (sandbox.runner.Runtime) over the layers so far; the
runtime writes the run's overlay upper directory as a layer tar, which goes through the same
safe extraction as a pulled layer. The run's working directory is a scratch bind (not part of
the image), so RUN first `cd`s into WORKDIR with /bin/sh when one is set. As with Docker,
what a RUN step leaves in /tmp is part of its layer.

`DEBIAN <suite> <pkg,...>` (directly after FROM scratch) runs `mmdebstrap --mode=unshare
--variant=extract` and takes its tar (packages and their dependencies, unpacked but not
configured) as the base layer. Host files enter only through COPY of the context directory, or
of an absolute path given as a build ARG (how images/busybox takes the host's static busybox).

Output is reproducible: sorted tar entries, mtime 0, gzip without timestamps, a fixed `created`.
images/<name>/image.toml may hold a [test] table (cmd, stdin, expect) that the build runs in
the new image to prove it works.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from typing import Callable

import msgspec

from sandbox.config import RuntimeSettings
from sandbox.errors import ImageError, InvalidSpec
from sandbox.oci import model
from sandbox.oci.dockerfile import (LAYER_KEYWORDS, Instruction, parse, parse_env,
                                    split_words, substitute)
from sandbox.oci.layertar import compress_layer, content_hash, tree_entries, write_tar
from sandbox.oci.pull import ProgressEvent, ProgressFn, Puller
from sandbox.oci.reference import parse_reference
from sandbox.oci.store import ImageStore, RefRecord
from sandbox.spec import GiB, MiB, Limits, Rootfs, RunSpec, Verdict

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CREATED = "1970-01-01T00:00:00Z"
"""The `created` time of every image and history entry sbx builds (reproducibility)."""
BUILD_SCRATCH = "/.sbx-build"
"""Working directory of RUN steps: a scratch bind, not part of the image."""
RUN_LIMITS = Limits(cpu_time=600, wall_time=1800, memory=4 * GiB, pids=4096, output=8 * MiB,
                    file_size=8 * GiB, open_files=4096, disk=8 * GiB)
MMDEBSTRAP_TIMEOUT = 1800
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CACHE_VERSION = "sbx-build-v1"
"""Bump to invalidate every build-cache entry."""


class TestSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cmd: list[str]
    stdin: str = ""
    expect: str | None = None


class ImageDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """images/<name>/image.toml (optional)."""

    test: TestSpec | None = None


class StepResult(msgspec.Struct, frozen=True):
    index: int
    text: str
    key: str
    layer: bool
    cached: bool
    diff_id: str | None = None


class BuildResult(msgspec.Struct, frozen=True):
    reference: str
    digest: str
    steps: list[StepResult]
    test_output: bytes | None = None

    @property
    def built(self) -> int:
        """Layers made by this build (cache misses)."""
        return sum(1 for s in self.steps if s.layer and not s.cached)

    @property
    def cached(self) -> int:
        return sum(1 for s in self.steps if s.layer and s.cached)


class CacheEntry(msgspec.Struct, frozen=True):
    blobs: list[str]
    diff_ids: list[str]
    size: int
    created_by: str


class _State:
    def __init__(self) -> None:
        self.key = hashlib.sha256(CACHE_VERSION.encode()).hexdigest()
        self.layers: list[tuple[str, str, int]] = []  # (blob digest, diff_id, size)
        self.env: dict[str, str] = {}
        self.cmd: list[str] | None = None
        self.entrypoint: list[str] | None = None
        self.workdir = ""
        self.user = ""
        self.labels: dict[str, str] = {}
        self.history: list[model.History] = []
        self.args: dict[str, str] = {}
        self.host_args: set[str] = set()

    def chain(self, text: str, inputs: str = "") -> str:
        self.key = hashlib.sha256(f"{self.key}\n{text}\n{inputs}".encode()).hexdigest()
        return self.key

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}


def _runtime_factory(settings: RuntimeSettings):
    try:
        from sandbox.runner import Runtime
    except ImportError as exc:  # pragma: no cover - depends on the runtime being installed
        raise ImageError(f"RUN steps need the sbx runtime: {exc}") from None
    return Runtime(settings)


class Builder:
    def __init__(self, settings: RuntimeSettings, *, store: ImageStore | None = None,
                 puller: Puller | None = None, progress: ProgressFn = lambda e: None,
                 runtime_factory: Callable[[RuntimeSettings], object] = _runtime_factory) -> None:
        self.settings = settings
        self.store = store or ImageStore(settings)
        self.puller = puller or Puller(settings, self.store, progress=progress)
        self.progress = progress
        self.runtime_factory = runtime_factory
        self._runtime = None
        self.cache_dir = os.path.join(self.store.root, "build-cache")
        os.makedirs(self.cache_dir, exist_ok=True)

    # -- entry point ------------------------------------------------------------------------

    def build(self, context: str, *, tag: str | None = None,
              build_args: dict[str, str] | None = None, run_test: bool = True,
              no_cache: bool = False) -> BuildResult:
        context = os.path.realpath(context)
        dockerfile = os.path.join(context, "Dockerfile")
        try:
            with open(dockerfile, encoding="utf-8") as f:
                instructions = parse(f.read())
        except FileNotFoundError:
            raise InvalidSpec(f"{context} has no Dockerfile", field="context") from None
        image_def = self._image_def(context)
        ref = parse_reference(tag or os.path.basename(context), self.settings.registry)
        state = _State()
        steps: list[StepResult] = []
        try:
            with self.store.store_lock(shared=True):
                for i, ins in enumerate(instructions, 1):
                    steps.append(self._step(i, len(instructions), ins, state, context,
                                            build_args or {}, no_cache))
                record = self._write_image(state, str(ref))
                test_output = None
                if run_test and image_def.test is not None:
                    test_output = self._run_test(record, image_def.test)
        finally:
            if self._runtime is not None and hasattr(self._runtime, "close"):
                self._runtime.close()
            self._runtime = None
        self.progress(ProgressEvent("done", str(ref)))
        return BuildResult(record.reference, record.digest, steps, test_output)

    @staticmethod
    def _image_def(context: str) -> ImageDef:
        path = os.path.join(context, "image.toml")
        if not os.path.exists(path):
            return ImageDef()
        with open(path, "rb") as f:
            try:
                return msgspec.convert(tomllib.load(f), ImageDef)
            except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
                raise InvalidSpec(f"{path}: {exc}", field="image.toml") from None

    # -- steps ------------------------------------------------------------------------------

    def _step(self, i: int, n: int, ins: Instruction, st: _State, context: str,
              build_args: dict[str, str], no_cache: bool) -> StepResult:
        kw = ins.keyword
        label = f"[{i}/{n}] {ins.text}"
        if kw not in LAYER_KEYWORDS:
            key = self._config_step(ins, st, build_args)
            self.progress(ProgressEvent("step", label))
            return StepResult(i, ins.text, key, layer=False, cached=False)
        inputs, produce = self._layer_step(ins, st, context)
        key = st.chain(ins.text if kw != "RUN" else f"{ins.text} {sorted(st.args.items())}",
                       inputs)
        entry = None if no_cache else self._cache_get(key)
        cached = entry is not None
        self.progress(ProgressEvent("step", f"{label}{' (cached)' if cached else ''}"))
        if entry is None:
            entry = produce(key)
            self._cache_put(key, entry)
        st.layers.append((entry.blobs[0], entry.diff_ids[0], entry.size))
        st.history.append(model.History(created=CREATED, created_by=ins.text))
        return StepResult(i, ins.text, key, layer=True, cached=cached, diff_id=entry.diff_ids[0])

    def _config_step(self, ins: Instruction, st: _State, build_args: dict[str, str]) -> str:
        kw, args = ins.keyword, ins.args
        if kw == "ARG":
            name, eq, default = args.partition("=")
            name = name.strip()
            value = build_args.get(name, substitute(default, st.variables()) if eq else "")
            st.args[name] = value
            return st.chain(f"ARG {name}={value}")
        if kw == "FROM":
            text = substitute(args, st.variables())
            if text == "scratch":
                st.env = {"PATH": DEFAULT_PATH}
                return st.chain("FROM scratch")
            img = self.puller.ensure(text)
            manifest = self.store.manifest(img.digest)
            cfg = self.store.config_file(manifest.config.digest)
            st.layers = [(d.digest, diff, d.size)
                         for d, diff in zip(manifest.layers, cfg.rootfs.diff_ids)]
            c = cfg.config
            st.env = dict(e.partition("=")[::2] for e in (c.env or []))
            st.cmd, st.entrypoint = c.cmd, c.entrypoint
            st.workdir, st.user = c.working_dir or "", c.user or ""
            st.labels = dict(c.labels or {})
            st.history = list(cfg.history or [])
            return st.chain(f"FROM {img.digest}")
        text = substitute(args, st.variables()) if kw in ("ENV", "WORKDIR", "USER", "LABEL") else args
        if kw == "ENV":
            for k, v in parse_env(text, ins.line):
                st.env[k] = substitute(v, st.variables())
        elif kw == "LABEL":
            st.labels.update(parse_env(text, ins.line))
        elif kw == "WORKDIR":
            st.workdir = os.path.normpath(os.path.join(st.workdir or "/", text))
        elif kw == "USER":
            st.user = text
        elif kw in ("CMD", "ENTRYPOINT"):
            argv = list(ins.exec_form) if ins.exec_form else ["/bin/sh", "-c", args]
            if kw == "CMD":
                st.cmd = argv
            else:
                st.entrypoint = argv
        st.history.append(model.History(created=CREATED, created_by=ins.text, empty_layer=True))
        return st.chain(f"{kw} {text}")

    def _layer_step(self, ins: Instruction, st: _State, context: str):
        """(inputs hash, produce(key) -> CacheEntry) for a layer-adding instruction."""
        if ins.keyword == "DEBIAN":
            words = substitute(ins.args, st.variables()).split()
            if len(words) != 2:
                raise InvalidSpec(f"line {ins.line}: DEBIAN <suite> <pkg,pkg,...>",
                                  field="Dockerfile")
            suite, packages = words[0], ",".join(sorted(p for p in words[1].split(",") if p))
            return f"debian {suite} {packages}", lambda key: self._debian(key, suite, packages,
                                                                          ins.text)
        if ins.keyword == "COPY":
            entries = self._copy_entries(ins, st, context)
            return content_hash(entries), lambda key: self._copy(key, entries, ins.text)
        return "", lambda key: self._run(key, ins, st)

    def _copy_entries(self, ins: Instruction, st: _State, context: str):
        raw = split_words(ins.args, ins.line)
        if len(raw) < 2:
            raise InvalidSpec(f"line {ins.line}: COPY <src>... <dest>", field="Dockerfile")
        variables = st.variables()
        dest = substitute(raw[-1], variables)
        if not dest.startswith("/"):
            dest = os.path.join(st.workdir or "/", dest)
        dest_is_dir = dest.endswith("/") or len(raw) > 2
        dest_rel = os.path.normpath(dest).lstrip("/")
        if dest_rel in (".", "") or dest_rel.startswith(".."):
            dest_rel = ""
        chmod = next((int(v, 8) for k, v in ins.flags if k == "chmod"), None)
        entries = []
        for token in raw[:-1]:
            src = substitute(token, variables)
            arg_name = token.strip("${}")
            if os.path.isabs(src):
                if token not in (f"${arg_name}", f"${{{arg_name}}}") or arg_name not in st.args:
                    raise InvalidSpec(f"line {ins.line}: COPY from an absolute host path is only "
                                      "allowed through a build ARG", field="Dockerfile")
                path = os.path.realpath(src)
            else:
                path = os.path.realpath(os.path.join(context, src))
                if path != context and not path.startswith(context + os.sep):
                    raise InvalidSpec(f"line {ins.line}: COPY source {src!r} is outside the "
                                      "build context", field="Dockerfile")
            if not os.path.lexists(path):
                raise InvalidSpec(f"line {ins.line}: COPY source {src!r} not found",
                                  field="Dockerfile")
            if os.path.isdir(path):
                entries.extend(tree_entries(path, dest_rel, chmod=chmod))
            else:
                target = (f"{dest_rel}/{os.path.basename(path)}".lstrip("/")
                          if dest_is_dir else dest_rel)
                if not target:
                    raise InvalidSpec(f"line {ins.line}: COPY of a file needs a destination",
                                      field="Dockerfile")
                entries.extend(tree_entries(path, target, chmod=chmod))
        return entries

    # -- producing layers -------------------------------------------------------------------

    def _commit_tar(self, tar_path: str, created_by: str) -> CacheEntry:
        blob_tmp = self.store.tmp_path("blob")
        try:
            diff_id, size = compress_layer(tar_path, blob_tmp)
            digest = self.store.add_blob_file(blob_tmp)
        finally:
            for p in (tar_path, blob_tmp):
                if os.path.exists(p):
                    os.unlink(p)
        self.store.ensure_layer(diff_id, digest, model.OCI_LAYER_GZIP)
        return CacheEntry([digest], [diff_id], size, created_by)

    def _copy(self, key: str, entries, text: str) -> CacheEntry:
        tar_path = self.store.tmp_path("copy-tar")
        write_tar(entries, tar_path)
        return self._commit_tar(tar_path, text)

    def _debian(self, key: str, suite: str, packages: str, text: str) -> CacheEntry:
        if shutil.which("mmdebstrap") is None:
            raise ImageError("DEBIAN needs mmdebstrap (apt-get install mmdebstrap)")
        tar_path = self.store.tmp_path("debian-tar") + ".tar"
        argv = ["mmdebstrap", "--mode=unshare", "--variant=extract", "--format=tar",
                "--quiet", f"--include={packages}", suite, tar_path, DEBIAN_MIRROR]
        env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=MMDEBSTRAP_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            raise ImageError(f"{text}: mmdebstrap timed out") from None
        if proc.returncode != 0:
            if os.path.exists(tar_path):
                os.unlink(tar_path)
            raise ImageError(f"{text}: mmdebstrap failed: "
                             f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return self._commit_tar(tar_path, text)

    def _run(self, key: str, ins: Instruction, st: _State) -> CacheEntry:
        if self._runtime is None:
            self._runtime = self.runtime_factory(self.settings)
        if ins.exec_form:
            argv = list(ins.exec_form)
            if st.workdir:
                argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', st.workdir, *argv]
        else:
            script = ins.args if not st.workdir else f"cd '{st.workdir}' && {ins.args}"
            argv = ["/bin/sh", "-c", script]
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", **st.args, **st.env}
        uid = int(st.user) if st.user.isdigit() else 0
        spec = RunSpec(cmd=argv, env=env, workdir=BUILD_SCRATCH, uid=uid, gid=uid,
                       limits=RUN_LIMITS, hostname="sbx-build")
        tar_path = self.store.tmp_path("run-tar") + ".tar"
        result = self._runtime.run(spec, self._rootfs(st), diff_tar=tar_path)
        if result.verdict != Verdict.OK:
            if os.path.exists(tar_path):
                os.unlink(tar_path)
            detail = (result.stderr or result.stdout)[-2000:].decode(errors="replace")
            raise ImageError(f"line {ins.line}: {ins.text} failed: {result.verdict.value}"
                             f"{f' (exit {result.exit_code})' if result.exit_code else ''}"
                             f"{' ' + result.message if result.message else ''}\n{detail}")
        if not os.path.exists(tar_path):
            raise ImageError(f"line {ins.line}: the runtime wrote no layer for {ins.text}")
        return self._commit_tar(tar_path, ins.text)

    def _rootfs(self, st: _State) -> Rootfs:
        layers = tuple(self.store.layer_path(diff) for _, diff, _ in st.layers)
        return Rootfs(layers or (self.store.empty_layer(),))

    # -- cache ------------------------------------------------------------------------------

    def _cache_get(self, key: str) -> CacheEntry | None:
        try:
            with open(os.path.join(self.cache_dir, key + ".json"), "rb") as f:
                entry = msgspec.json.decode(f.read(), type=CacheEntry)
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        if all(self.store.has_blob(b) for b in entry.blobs) and all(
                self.store.has_layer(d) for d in entry.diff_ids):
            return entry
        return None

    def _cache_put(self, key: str, entry: CacheEntry) -> None:
        tmp = self.store.tmp_path("cache")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(entry))
        os.rename(tmp, os.path.join(self.cache_dir, key + ".json"))

    # -- output -----------------------------------------------------------------------------

    def _write_image(self, st: _State, reference: str) -> RefRecord:
        cfg = model.ConfigFile(
            architecture="amd64", os="linux", created=CREATED,
            config=model.ContainerConfig(
                user=st.user or None,
                env=[f"{k}={v}" for k, v in st.env.items()] or None,
                entrypoint=st.entrypoint, cmd=st.cmd, working_dir=st.workdir or None,
                labels=st.labels or None),
            rootfs=model.RootFS("layers", [d for _, d, _ in st.layers]),
            history=st.history or None)
        cfg_raw = model.encode(cfg)
        cfg_digest = self.store.put_blob(cfg_raw)
        manifest = model.Manifest(
            schema_version=2, media_type=model.OCI_MANIFEST,
            config=model.Descriptor(model.OCI_CONFIG, cfg_digest, len(cfg_raw)),
            layers=[model.Descriptor(model.OCI_LAYER_GZIP, b, size) for b, _, size in st.layers])
        raw = model.encode(manifest)
        record = RefRecord(reference, self.store.put_blob(raw), cfg_digest, model.OCI_MANIFEST)
        self.store.set_ref(record)
        return record

    def _run_test(self, record: RefRecord, test: TestSpec) -> bytes:
        image = self.store.resolve(record)
        if self._runtime is None:
            self._runtime = self.runtime_factory(self.settings)
        env = {"PATH": DEFAULT_PATH, **image.config.env_dict()}
        spec = RunSpec(cmd=test.cmd, env=env, stdin=test.stdin.encode(),
                       limits=Limits(cpu_time=60, wall_time=120, memory=1 * GiB, pids=256,
                                     disk=512 * MiB))
        result = self._runtime.run(spec, image.rootfs)
        self.progress(ProgressEvent("step", f"test {' '.join(test.cmd)} -> {result.verdict.value}"))
        if result.verdict != Verdict.OK or (test.expect is not None and
                                            result.stdout != test.expect.encode()):
            raise ImageError(f"image test of {record.reference} failed: {result.verdict.value} "
                             f"stdout={result.stdout[-500:]!r} stderr={result.stderr[-1000:]!r} "
                             f"{result.message}")
        return result.stdout
