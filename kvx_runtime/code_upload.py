"""Code upload: run changed code without rebuilding the image.

The laptop packs the project's code and configuration into a deterministic archive, stored
content-addressed under ``<storage root>/kvx-code/<sha256>.tar.gz``; every step of the run
gets ``--code <uri>#sha256=<digest>``, downloads it once per container, checks the digest
before unpacking anything, and runs with the archive's package (shadowing the one installed
in the image) and the archive's configuration (``conf/``, or the project's ``CONF_SOURCE``),
in the image's project directory (so relative data paths resolve as without code upload).

What goes in: the source package (under ``[tool.kedro] source_dir``, where the step imports
it from), ``conf/`` (the project's ``CONF_SOURCE``, at the same place) without ``conf/local``
and without any ``credentials*`` file, ``pyproject.toml``; ``.env`` files never; files that the
project's .gitignore files (nested ones too) or its .dockerignore leave out stay out.
Deterministic: sorted members, fixed times, owners and modes, so the digest depends on content
only. The manifest lists every file and its sha256, checked after unpacking. The archive records
the fingerprint of the project's declared requirements; a step whose image was built from other
requirements stops (code upload never installs packages). Trust: whoever can write
``<root>/kvx-code/`` can run code in the steps, the same trust as whoever can push to the image
registry (docs/code-upload.md).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError, InputDataError, StorageError, UsageError
from kvx_runtime.log import get_logger

if TYPE_CHECKING:
    from kvx_runtime.project import KedroProject

__all__ = [
    "CodeArchive",
    "build_archive",
    "check_drift",
    "check_package_from_archive",
    "fetch_code",
    "parse_code_reference",
    "requirements_fingerprint",
    "upload_archive",
]

log = get_logger(__name__)

CODE_DIR = "kvx-code"
MANIFEST = ".kvx-code.json"
#: Written into images built from the project template: the requirements they hold.
IMAGE_FINGERPRINT = ".kvx-requirements.sha256"
FORMAT = 1
_FIXED_MTIME = 315532800  # 1980-01-01, what reproducible builds use
_REFERENCE = re.compile(r"^(?P<uri>.+)#sha256=(?P<digest>[0-9a-f]{64})$")


class CodeRejected(InputDataError):
    """The archive is not what it claims to be, or would write outside its directory."""


@dataclass(frozen=True)
class CodeArchive:
    data: bytes
    digest: str
    files: tuple[str, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.digest}.tar.gz"


def _max_bytes() -> int:
    return settings.CODE_MAX_BYTES.get()


def requirements_fingerprint(project: Path) -> str:
    """sha256 of the project's declared requirements (requirements.txt, else pyproject's
    ``[project].dependencies``), normalized: comments, blank lines and order do not count."""
    requirements = project / "requirements.txt"
    lines: list[str] = []
    if requirements.is_file():
        lines = _requirement_lines(requirements, set())
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            lines = list(tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
                         ["dependencies"])
        except (OSError, KeyError, ValueError):
            lines = []
    normalized = sorted({re.sub(r"\s+", "", _PIP_COMMENT.sub("", line)).lower() for line in lines} - {""})
    return hashlib.sha256("\n".join(normalized).encode()).hexdigest()


#: pip's comments: ``#`` at a line's start or after whitespace (``...whl#sha256=`` is not one).
_PIP_COMMENT = re.compile(r"(^|\s)#.*$")
_INCLUDE = re.compile(r"^(-r|--requirement|-c|--constraint)(?:\s*=\s*|\s+)(\S+)$")


def _requirement_lines(path: Path, seen: set[Path]) -> list[str]:
    """A requirements file's lines, with the files it includes (``-r``, ``-c``, relative to it)
    in place: a change to an included file is a change of the project's requirements."""
    resolved = path.resolve()
    if resolved in seen:
        return []
    seen.add(resolved)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return [f"<unreadable {path.name}>"]
    lines: list[str] = []
    for line in text.splitlines():
        stripped = _PIP_COMMENT.sub("", line).strip()
        include = _INCLUDE.match(stripped)
        lines.append(stripped)
        if include and "://" not in include.group(2):
            lines += _requirement_lines(path.parent / include.group(2), seen)
    return lines


class _GitIgnored:
    """git's rule over every .gitignore of the project, not only the top one: each applies to
    the paths below its folder, a deeper file's verdict wins over a higher one's, and nothing
    below an ignored folder comes back (git does not even read the .gitignore files in it)."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self._specs: dict[str, Any] = {}  # folder (project-relative) -> its GitIgnoreSpec, or None

    def _spec(self, folder: str) -> Any:
        if folder not in self._specs:
            import pathspec

            path = self.project / folder / ".gitignore"
            self._specs[folder] = pathspec.GitIgnoreSpec.from_lines(
                path.read_text(encoding="utf-8", errors="replace").splitlines()) if path.is_file() else None
        return self._specs[folder]

    def __call__(self, relative: str) -> bool:
        parts = relative.split("/")
        for depth in range(1, len(parts) + 1):  # each parent folder, then the path itself
            is_folder = depth < len(parts)
            verdict = None
            for level in range(depth):  # the .gitignore files above it, top-down: the deepest decides
                spec = self._spec("/".join(parts[:level]))
                if spec is None:
                    continue
                below = "/".join(parts[level:depth]) + ("/" if is_folder else "")  # "/": a folder, to git
                included = spec.check_file(below).include  # None: no pattern of this file matched
                verdict = verdict if included is None else included
            if verdict:
                return True
        return False


def _ignore_rules(project: Path) -> Any:
    """A predicate: is this project-relative POSIX path left out by the project's .gitignore
    files or its .dockerignore?"""
    from kvx_runtime.dockerignore import DockerIgnore

    git = _GitIgnored(project)
    docker = DockerIgnore.of_project(project)

    def ignored(relative: str) -> bool:
        return git(relative) or (docker is not None and docker.excludes(relative))

    return ignored


#: Config environments a code archive never holds: the laptop's own (credentials, experiments).
NOT_UPLOADED_ENVS = ("local",)


def _never_packed(parts: list[str], conf_parts: list[str] | None) -> bool:
    """Left out whatever the ignore files say: the laptop's secrets. ``parts``: the path's
    components in the archive; ``conf_parts``: those below the configuration folder (None when
    the path is not in it)."""
    if any(part == ".env" or part.startswith(".env.") for part in parts):
        return True  # dotenv files hold the laptop's secrets (.env, .env.local, ...), in any folder
    # The laptop's own environment, and credentials files or folders at any depth of the configuration.
    return conf_parts is not None and (conf_parts[0] in NOT_UPLOADED_ENVS or
                                       any(part.lower().startswith("credentials") for part in conf_parts))


def _conf_arcroot(project: Path, conf_dir: Path) -> str:
    """The configuration's folder in the archive: where it is in the project (``CONF_SOURCE``,
    relative, as the step resolves it against the unpacked archive)."""
    # Lexically, as the step's settings name it: a symlinked folder travels under its link's name.
    if not conf_dir.is_dir():
        raise ConfigError(f"code upload carries the project's configuration folder, and {conf_dir} (CONF_SOURCE) "
                          "is not a folder",
                          hint="keep the configuration as a folder of the project, or run without code upload")
    relative = Path(os.path.relpath(os.path.abspath(conf_dir), os.path.abspath(project)))
    if ".." in relative.parts or not relative.parts or relative.as_posix() == ".":
        raise ConfigError(f"code upload carries the project's configuration, and {conf_dir} (CONF_SOURCE) is "
                          f"outside the project {project}",
                          hint="keep the configuration in a folder of the project, or run without code upload")
    return relative.as_posix()


def _members(project: Path, package_dir: Path, package_arcroot: str, conf_dir: Path) -> list[tuple[str, Path]]:
    """(name in the archive, file) for everything the archive holds, sorted."""
    ignored = _ignore_rules(project)
    chosen: dict[str, Path] = {}
    # The configuration where the archive's settings.py (CONF_SOURCE) looks for it, in the step.
    conf_arcroot = _conf_arcroot(project, conf_dir)
    for root, arcroot in ((package_dir, package_arcroot), (conf_dir, conf_arcroot)):
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root).as_posix()
            parts = relative.split("/")
            if path.is_dir() or "__pycache__" in parts or path.suffix in {".pyc", ".pyo"}:
                continue
            name = f"{arcroot}/{relative}"
            # The configuration's rules wherever the walk meets it (a CONF_SOURCE inside the
            # package is walked with the package too).
            in_conf = name == conf_arcroot or name.startswith(conf_arcroot + "/")
            if _never_packed(name.split("/"), name[len(conf_arcroot) + 1:].split("/") if in_conf else None):
                continue
            try:
                project_relative = path.relative_to(project).as_posix()
            except ValueError:
                project_relative = f"{arcroot}/{relative}"
            if ignored(project_relative):
                continue
            if path.is_symlink() and path.is_file():
                if path.resolve().is_relative_to(project.resolve()):
                    chosen[name] = path  # a link to a file of the project travels as that file
                else:
                    log.warning("a link to a file outside the project does not travel in the code archive",
                                path=project_relative, target=str(path.resolve()))
                continue
            if path.is_symlink() or not path.is_file():
                continue  # special files never travel
            chosen[name] = path
    if (project / "pyproject.toml").is_file():
        chosen["pyproject.toml"] = project / "pyproject.toml"
    return sorted(chosen.items())


def build_archive(project: Path, package_name: str, conf_dir: Path | None = None) -> CodeArchive:
    """The project's code and configuration as a deterministic tar.gz."""
    from kvx_runtime import __version__

    package_dir, package_arcroot = _package_dir(project, package_name)
    members = _members(project, package_dir, package_arcroot, conf_dir or project / "conf")
    fingerprint = requirements_fingerprint(project)
    contents = [(name, path.read_bytes()) for name, path in members]
    _refuse_private_keys(contents)
    # Executable files stay executable (a node running a script of the project); only that bit
    # of the mode travels, so the digest still depends on content alone.
    executable = {name for name, path in members if os.access(path, os.X_OK)}
    # Every file and its sha256: the step checks what it unpacked against them (a tar cut at a
    # member's boundary reads as a complete, shorter archive).
    listed = {name: hashlib.sha256(data).hexdigest() for name, data in contents}
    manifest = json.dumps({"format": FORMAT, "package": package_name, "requirements_sha256": fingerprint,
                           "kvx_runtime": __version__, "files": listed}, sort_keys=True).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(MANIFEST, manifest), *contents]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _FIXED_MTIME
            info.mode = 0o755 if name in executable else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="", compresslevel=9) as handle:
        handle.write(raw.getvalue())
    data = compressed.getvalue()
    if len(data) > _max_bytes():
        raise ConfigError(f"the code archive is {len(data) / 1e6:.1f} MB, over the {_max_bytes() / 1e6:.0f} MB limit",
                          hint="leave large files out with .gitignore/.dockerignore, or raise KVX_CODE_MAX_BYTES")
    return CodeArchive(data=data, digest=hashlib.sha256(data).hexdigest(),
                       files=tuple(name for name, _ in members), fingerprint=fingerprint)


#: What a file holding a private key says of itself (a mention of the words, in code or docs,
#: is not one): a PEM or PGP block with a body, in a file or inside a JSON string (escaped line
#: breaks); a PuTTY key file. Each pattern is linear in the file's size.
_KEY_BLOCKS = (
    (re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:\\n|\s)+[A-Za-z0-9+/=\s\\]{40,}?"
                rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"), "a PEM private key"),
    (re.compile(rb"-----BEGIN PGP PRIVATE KEY BLOCK-----[^-]{40,}?-----END PGP PRIVATE KEY BLOCK-----"),
     "a PGP private key"),
    (re.compile(rb"\APuTTY-User-Key-File-\d+:[^\n]*\n(?:[^\n]*\n)*?Private-Lines: \d+"), "a PuTTY private key"),
)
#: Google's credential files (JSON): every marker of one, in any order.
_KEY_FILES = (
    ((re.compile(rb'"type"\s*:\s*"service_account"'), re.compile(rb'"private_key"\s*:\s*"-----BEGIN')),
     "a Google service-account key"),
    ((re.compile(rb'"type"\s*:\s*"authorized_user"'), re.compile(rb'"refresh_token"\s*:\s*"[^"]')),
     "Google user credentials"),
)
_KEY_FILE_MAX_BYTES = 1 << 20


def _private_key_in(data: bytes) -> str | None:
    """What private key ``data`` holds, the most telling name first, or None."""
    if len(data) <= _KEY_FILE_MAX_BYTES:  # credential files are small: a large one is data
        for markers, what in _KEY_FILES:
            if all(marker.search(data) for marker in markers):
                return what
    return next((what for pattern, what in _KEY_BLOCKS if pattern.search(data)), None)


def _refuse_private_keys(contents: list[tuple[str, bytes]]) -> None:
    """The archive goes to the storage bucket, readable by whoever reads the bucket: a file
    holding a private key stops the upload (exit 2), naming it, rather than travel or be
    silently left out (a node reading it would fail in the cloud only)."""
    found = [f"{name} ({what})" for name, data in contents if (what := _private_key_in(data)) is not None]
    if found:
        raise ConfigError(
            f"code upload would copy private keys to the storage bucket: {', '.join(found[:5])}"
            + (f" and {len(found) - 5} more" if len(found) > 5 else ""),
            hint="leave them out with .gitignore or .dockerignore (the image holds what .dockerignore lets in), "
                 "and give the steps credentials at run time (Workload Identity, run_config.secrets, Secret Manager)")


def _package_dir(project: Path, package_name: str) -> tuple[Path, str]:
    """The package's folder, and its name in the archive: where the step's Python imports it
    from, i.e. under the archive's ``[tool.kedro] source_dir`` (the archive holds the project's
    pyproject.toml), as Kedro bootstraps the unpacked archive."""
    from kvx_runtime.project import source_dir_of

    source_dir = source_dir_of(project)
    package_dir = project / source_dir / package_name
    if not (package_dir / "__init__.py").is_file():
        raise ConfigError(f"the project's package {package_name} is not in {package_dir} (pyproject.toml's "
                          f"[tool.kedro] source_dir is {source_dir!r}), so code upload cannot carry it",
                          hint="set [tool.kedro] source_dir to the folder that holds the package")
    return package_dir, package_name if source_dir == "." else f"{source_dir}/{package_name}"


def check_package_from_archive(code_dir: Path, package_name: str) -> None:
    """After the unpacked archive is bootstrapped: the step imports the archive's package, not
    the image's (which would run the old code and succeed, silently)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package_name)
    except (ImportError, ValueError):
        spec = None
    locations = [spec.origin] if spec is not None and spec.origin else []
    if spec is not None and spec.submodule_search_locations:
        locations += list(spec.submodule_search_locations)
    root = code_dir.resolve()
    if not any(Path(location).resolve().is_relative_to(root) for location in locations):
        raise ConfigError(f"the step would import the package {package_name} from "
                          f"{', '.join(map(str, locations)) or 'nowhere'}, not from the code archive {code_dir}: "
                          "it would run the image's code",
                          hint="pack the archive with this kvx-runtime version, whose archive follows "
                               "[tool.kedro] source_dir")


def upload_archive(archive: CodeArchive, storage_root: str) -> str:
    """Store the archive content-addressed under the storage root (only when absent);
    return the ``--code`` reference ``<uri>#sha256=<digest>``."""
    from kvx_runtime.storage.store import _filesystem

    fs, base = _filesystem(storage_root)
    path = f"{base}/{CODE_DIR}/{archive.name}"
    uri = f"{storage_root.rstrip('/')}/{CODE_DIR}/{archive.name}"
    try:
        stored = fs.exists(path) and int(fs.size(path)) == len(archive.data)
        # Of the right size, read back: a damaged object is replaced (every step would refuse it).
        if stored and hashlib.sha256(bytes(fs.cat_file(path))).hexdigest() == archive.digest:
            log.info("code archive already stored", uri=uri)
        else:
            if stored:
                log.warning("the stored code archive is damaged (its content is not its name's digest): "
                            "storing it again", uri=uri)
            fs.makedirs(f"{base}/{CODE_DIR}", exist_ok=True)
            fs.pipe_file(path, archive.data)
            log.info("code archive stored", uri=uri, bytes=len(archive.data), files=len(archive.files))
    except OSError as exc:
        raise StorageError(f"could not store the code archive at {uri}: {exc}") from exc
    return f"{uri}#sha256={archive.digest}"


def parse_code_reference(reference: str) -> tuple[str, str]:
    match = _REFERENCE.match(reference.strip())
    if not match:
        raise UsageError(f"--code {reference!r} must look like <uri>#sha256=<64 hex digits>")
    return match.group("uri"), match.group("digest")


def _download(uri: str, limit: int) -> bytes:
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    from kvx_runtime.storage.store import _filesystem, is_transient

    root, _, name = uri.rpartition("/")
    fs, base = _filesystem(root)

    def attempt() -> bytes:
        size = int(fs.size(f"{base}/{name}"))
        if size > limit:
            raise CodeRejected(f"the code archive {uri} is {size} bytes, over the {limit}-byte limit "
                               "(KVX_CODE_MAX_BYTES)")
        return bytes(fs.cat_file(f"{base}/{name}"))

    try:
        return Retrying(stop=stop_after_attempt(4), wait=wait_random_exponential(multiplier=0.5, max=10),
                        retry=retry_if_exception(is_transient), reraise=True)(attempt)
    except FileNotFoundError:
        raise CodeRejected(f"the code archive {uri} does not exist") from None
    except CodeRejected:
        raise
    except Exception as exc:
        raise StorageError(f"could not download the code archive {uri}: {type(exc).__name__}: {exc}") from exc


_NOT_OURS = "pack it again with code upload (compile or run-once with --code-upload), with the same kvx-runtime " \
            "version as the image's"


def _safe_extract(data: bytes, target: Path) -> dict[str, Any]:
    """Unpack, refusing anything that would land outside ``target`` or is not a plain file, and
    anything that is not the complete archive its manifest lists (damaged, foreign, cut short):
    one CodeRejected line (exit 2), never a traceback."""
    raw = _gunzip(data, settings.CODE_MAX_UNPACKED_BYTES.get())
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = tar.getmembers()
            _check_members(members)
            manifest = _read_manifest(tar, members)
            listed: dict[str, str] = manifest["files"]
            unpacked = {member.name for member in members if member.isfile()} - {MANIFEST}
            if unpacked != set(listed):
                missing, extra = sorted(set(listed) - unpacked), sorted(unpacked - set(listed))
                raise CodeRejected(f"the code archive is not the one its manifest lists ({len(missing)} file(s) "
                                   f"missing, e.g. {missing[:3]}; {len(extra)} not listed, e.g. {extra[:3]})",
                                   hint=_NOT_OURS)
            for member in members:
                destination = target / member.name
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                source = tar.extractfile(member)
                assert source is not None  # a plain file
                content = source.read()
                if member.name != MANIFEST and hashlib.sha256(content).hexdigest() != listed[member.name]:
                    raise CodeRejected(f"the code archive's {member.name} is not the file its manifest lists "
                                       "(another sha256)", hint=_NOT_OURS)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(content)
                if member.mode & 0o100:
                    destination.chmod(0o755)
    except (tarfile.TarError, EOFError) as exc:  # not a tar, or cut inside a member
        raise CodeRejected(f"the code archive is not a complete tar file: {exc}", hint=_NOT_OURS) from None
    return manifest


def _gunzip(data: bytes, limit: int) -> bytes:
    """The archive's tar, unpacked in memory up to ``limit`` bytes (a small archive may unpack to
    gigabytes: it is refused before they are made)."""
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # the gzip format
    try:
        raw = decompressor.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CodeRejected(f"the code archive is not a complete gzip file: {exc}", hint=_NOT_OURS) from None
    if len(raw) > limit:
        raise CodeRejected(f"the code archive unpacks to more than {limit} bytes (KVX_CODE_MAX_UNPACKED_BYTES)",
                           hint="leave data and build outputs out of the archive (.gitignore, .dockerignore)")
    if not decompressor.eof or decompressor.unused_data:
        raise CodeRejected("the code archive is not a complete gzip file (cut short, or data after its end)",
                           hint=_NOT_OURS)
    return raw


def _check_members(members: list[tarfile.TarInfo]) -> None:
    """Every member a plain file (or folder) landing inside the archive's directory, once, and
    no file where another member needs a folder: checked before anything is written."""
    files: set[str] = set()
    folders: set[str] = set()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not member.name or member.name.startswith("/"):
            raise CodeRejected(f"the code archive holds {member.name!r}, which would land outside its directory")
        if not (member.isfile() or member.isdir()):
            raise CodeRejected(f"the code archive holds {member.name!r}, which is not a plain file "
                               "(links and special files are refused)")
        name = path.as_posix()
        if member.isfile():
            if name in files:
                raise CodeRejected(f"the code archive holds {member.name!r} twice", hint=_NOT_OURS)
            files.add(name)
        else:
            folders.add(name)
        folders.update(parent.as_posix() for parent in path.parents if parent.as_posix() != ".")
    if files & folders:
        raise CodeRejected(f"the code archive holds {sorted(files & folders)[0]!r} both as a file and as a folder",
                           hint=_NOT_OURS)


def _read_manifest(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> dict[str, Any]:
    """The archive's manifest, checked to be kvx-runtime's, of this format, listing its files."""
    member = next((m for m in members if m.name == MANIFEST and m.isfile()), None)
    source = tar.extractfile(member) if member is not None else None
    if source is None:
        raise CodeRejected(f"the code archive has no kvx-runtime manifest ({MANIFEST})", hint=_NOT_OURS)
    try:
        manifest = json.loads(source.read().decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise CodeRejected(f"the code archive's manifest ({MANIFEST}) is not JSON: {exc}", hint=_NOT_OURS) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CodeRejected(f"the code archive's manifest is of format {found!r}, and this kvx-runtime reads format "
                           f"{FORMAT}", hint=_NOT_OURS)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) and isinstance(digest, str)
                                              for name, digest in files.items()):
        raise CodeRejected("the code archive's manifest lists no files (made by a kvx-runtime older than the "
                           "image's, which cannot check that the archive is complete)", hint=_NOT_OURS)
    return manifest


def fetch_code(reference: str, cache: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Download (once per container), verify and unpack the archive; returns its directory
    and manifest. Nothing is unpacked unless the digest matches."""
    uri, digest = parse_code_reference(reference)
    cache = cache or Path(settings.CODE_CACHE.get() or Path(tempfile.gettempdir()) / "kvx-code")
    target = cache / digest
    manifest_path = target / MANIFEST
    if manifest_path.is_file():
        log.info("code archive already unpacked in this container", directory=str(target))
        return target, json.loads(manifest_path.read_text())
    data = _download(uri, _max_bytes())
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CodeRejected(f"the code archive {uri} has sha256 {actual}, not {digest}: refused, nothing was run")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=cache))
    try:
        manifest = _safe_extract(data, staging)
        try:
            staging.rename(target)  # whole or not at all; a concurrent step may have won
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("code archive unpacked", uri=uri, directory=str(target), package=manifest.get("package"))
    return target, manifest


def check_drift(manifest: dict[str, Any], project: KedroProject) -> None:
    """The archive's requirements against the image's: code upload never installs packages."""
    recorded = project.path / IMAGE_FINGERPRINT
    if not recorded.is_file():
        log.warning("the image records no requirements fingerprint: code upload cannot check that the "
                    "archive's requirements are installed", expected=str(recorded))
        return
    image = recorded.read_text(encoding="utf-8").split()[0] if recorded.read_text(encoding="utf-8").strip() else ""
    if image == manifest.get("requirements_sha256"):
        return
    message = ("the project's requirements changed since the image was built (code upload never installs "
               "packages)")
    if project.plugin_config.run_config.code_upload_on_drift == "warn":
        log.warning(message + "; running anyway (run_config.code_upload_on_drift: warn)")
        return
    raise ConfigError(message, hint="rebuild and push the image, or set run_config.code_upload_on_drift: warn")
