"""Code upload's archive: deterministic, holding only code and shareable configuration, and
refused (before anything is unpacked) when tampered with or unsafe."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from kvx_runtime.code_upload import (
    CodeRejected,
    build_archive,
    fetch_code,
    requirements_fingerprint,
    upload_archive,
)
from kvx_runtime.errors import ConfigError, ExitCode


def _project(root: Path) -> Path:
    package = root / "src" / "demo_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nodes.py").write_text("def f():\n    return 1\n")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "nodes.cpython-311.pyc").write_bytes(b"\x00")
    for env in ("base", "local", "cloud"):
        (root / "conf" / env).mkdir(parents=True)
        (root / "conf" / env / "parameters.yml").write_text(f"env: {env}\n")
    (root / "conf" / "base" / "credentials.yml").write_text("db: {password: secret}\n")
    (root / "conf" / "cloud" / "credentials_gcp.yml").write_text("token: secret\n")
    (root / "conf" / "base" / "scratch.tmp").write_text("ignored by git\n")
    (root / ".gitignore").write_text("*.tmp\n")
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\n[tool.kedro]\npackage_name = "demo_pkg"\n')
    (root / "requirements.txt").write_text("kedro>=1.0\npandas  # data\n")
    return root


def test_the_archive_holds_code_and_shareable_conf_only(tmp_path: Path) -> None:
    archive = build_archive(_project(tmp_path), "demo_pkg")
    assert archive.files == ("conf/base/parameters.yml", "conf/cloud/parameters.yml", "pyproject.toml",
                             "src/demo_pkg/__init__.py", "src/demo_pkg/nodes.py")


def test_the_digest_depends_on_content_only(tmp_path: Path) -> None:
    project = _project(tmp_path)
    first = build_archive(project, "demo_pkg")
    later = time.time() + 3600
    for path in project.rglob("*"):
        os.utime(path, (later, later))
    assert build_archive(project, "demo_pkg").digest == first.digest
    (project / "src" / "demo_pkg" / "nodes.py").write_text("def f():\n    return 2\n")
    assert build_archive(project, "demo_pkg").digest != first.digest


def test_requirements_fingerprint_ignores_comments_and_order(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = requirements_fingerprint(project)
    (project / "requirements.txt").write_text("# deps\npandas\n\nkedro >= 1.0\n")
    assert requirements_fingerprint(project) == before
    (project / "requirements.txt").write_text("pandas\nkedro>=1.1\n")
    assert requirements_fingerprint(project) != before
    # What pip reads: included files (a change there is a change), URL fragments are not comments.
    (project / "requirements.txt").write_text("-r base.txt\npandas  # the frames\n")
    (project / "base.txt").write_text("kedro>=1.0\n-c requirements.txt\n")  # a cycle is read once
    included = requirements_fingerprint(project)
    (project / "base.txt").write_text("kedro>=1.1\n")
    assert requirements_fingerprint(project) != included
    wheel = "pkg @ https://example.com/pkg-1.0-py3-none-any.whl#sha256="
    (project / "requirements.txt").write_text(wheel + "a" * 64 + "\n")
    pinned = requirements_fingerprint(project)
    (project / "requirements.txt").write_text(wheel + "b" * 64 + "\n")
    assert requirements_fingerprint(project) != pinned


def test_fetch_checks_the_digest_before_unpacking_and_downloads_once(tmp_path: Path) -> None:
    archive = build_archive(_project(tmp_path / "p"), "demo_pkg")
    reference = upload_archive(archive, str(tmp_path / "root"))
    assert reference == f"{tmp_path / 'root'}/kvx-code/{archive.digest}.tar.gz#sha256={archive.digest}"
    directory, manifest = fetch_code(reference, cache=tmp_path / "cache")
    assert manifest["package"] == "demo_pkg" and (directory / "src" / "demo_pkg" / "nodes.py").is_file()
    stored = tmp_path / "root" / "kvx-code" / archive.name
    stored.unlink()  # a second step of the container does not download again
    assert fetch_code(reference, cache=tmp_path / "cache")[0] == directory

    tampered = bytearray(archive.data)
    tampered[-20] ^= 0xFF
    stored.write_bytes(bytes(tampered))
    with pytest.raises(CodeRejected, match="refused, nothing was run") as caught:
        fetch_code(reference, cache=tmp_path / "other-cache")
    assert caught.value.exit_code == ExitCode.USAGE
    assert not (tmp_path / "other-cache" / archive.digest).exists()
    # The next compile finds it damaged (same size, other content) and stores it again.
    assert upload_archive(archive, str(tmp_path / "root")) == reference
    assert stored.read_bytes() == archive.data
    assert fetch_code(reference, cache=tmp_path / "third-cache")[1]["package"] == "demo_pkg"


def _evil(members: list[tarfile.TarInfo], tmp_path: Path) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    data = gzip.compress(raw.getvalue())
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "kvx-code").mkdir(exist_ok=True)
    (tmp_path / "kvx-code" / f"{digest}.tar.gz").write_bytes(data)
    return f"{tmp_path}/kvx-code/{digest}.tar.gz#sha256={digest}"


def test_members_that_escape_or_are_not_plain_files_are_refused(tmp_path: Path) -> None:
    escape = tarfile.TarInfo("../outside.py")
    escape.size = 1
    with pytest.raises(CodeRejected, match="would land outside"):
        fetch_code(_evil([escape], tmp_path), cache=tmp_path / "c1")
    assert not (tmp_path / "outside.py").exists()
    link = tarfile.TarInfo("src/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(CodeRejected, match="not a plain file"):
        fetch_code(_evil([link], tmp_path), cache=tmp_path / "c2")
    absolute = tarfile.TarInfo("/etc/cron.d/x")
    absolute.size = 1
    with pytest.raises(CodeRejected):
        fetch_code(_evil([absolute], tmp_path), cache=tmp_path / "c3")


def test_the_size_limit(tmp_path: Path, monkeypatch) -> None:
    archive = build_archive(_project(tmp_path / "p"), "demo_pkg")
    reference = upload_archive(archive, str(tmp_path / "root"))
    monkeypatch.setenv("KVX_CODE_MAX_BYTES", "10")
    with pytest.raises(CodeRejected, match="over the 10-byte limit"):
        fetch_code(reference, cache=tmp_path / "cache")


def test_the_configuration_travels_where_the_projects_conf_source_puts_it(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "conf").rename(project / "config")
    archive = build_archive(project, "demo_pkg", project / "config")
    assert archive.files == ("config/base/parameters.yml", "config/cloud/parameters.yml", "pyproject.toml",
                             "src/demo_pkg/__init__.py", "src/demo_pkg/nodes.py")
    outside = tmp_path.parent / f"{tmp_path.name}-conf"
    (project / "config").rename(outside)
    with pytest.raises(ConfigError, match="is outside the project") as refused:
        build_archive(project, "demo_pkg", outside)
    assert refused.value.exit_code == ExitCode.USAGE


def test_a_configuration_that_is_not_a_folder_is_refused_not_left_out(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "conf.tar.gz").write_bytes(b"packed")
    for conf in (project / "conf.tar.gz", project / "missing"):
        with pytest.raises(ConfigError, match="is not a folder") as refused:
            build_archive(project, "demo_pkg", conf)
        assert refused.value.exit_code == ExitCode.USAGE


def test_a_conf_source_inside_the_package_keeps_credentials_and_the_laptops_env_out(tmp_path: Path) -> None:
    project = _project(tmp_path)
    inside = project / "src" / "demo_pkg" / "conf"
    (project / "conf").rename(inside)
    archive = build_archive(project, "demo_pkg", inside)
    assert archive.files == ("pyproject.toml", "src/demo_pkg/__init__.py", "src/demo_pkg/conf/base/parameters.yml",
                             "src/demo_pkg/conf/cloud/parameters.yml", "src/demo_pkg/nodes.py")


def test_a_symlinked_conf_folder_travels_under_its_name_in_the_project(tmp_path: Path) -> None:
    project = _project(tmp_path / "project")
    (project / "conf").rename(tmp_path / "shared-conf")
    (project / "conf").symlink_to(tmp_path / "shared-conf")
    assert build_archive(project, "demo_pkg", project / "conf").files[:2] == (
        "conf/base/parameters.yml", "conf/cloud/parameters.yml")


def test_a_dockerignored_folder_keeps_everything_below_it_out_at_any_depth(tmp_path: Path) -> None:
    """BuildKit's rule: a path is out when it or any parent matches, whatever the pattern's depth;
    the archive and what run-local copies (image_files) agree."""
    from kvx_runtime.dockerignore import DockerIgnore, image_files

    project = _project(tmp_path)
    for name in ("src/demo_pkg/secrets/deeper/key.json", "src/demo_pkg/secrets/README.md",
                 "conf/base/creds/deeper/token.json", "src/demo_pkg/vault/a/b/c.txt"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("secret\n")
    (project / ".dockerignore").write_text("**/secrets\n!**/secrets/README.md\nconf/base/creds\nsrc/*/vault\n")
    files = build_archive(project, "demo_pkg").files
    assert "src/demo_pkg/secrets/README.md" in files  # a later "!" brings it back
    assert not any(part in name for name in files for part in ("key.json", "token.json", "c.txt")), files
    copied = set(image_files(project))
    assert "src/demo_pkg/secrets/README.md" in copied
    assert not any(part in name for name in copied for part in ("key.json", "token.json", "c.txt")), copied
    ignore = DockerIgnore("secrets\nconf/**/credentials*\n")
    assert ignore.excludes("secrets/a/b/c") and ignore.excludes("conf/base/credentials/gcp/key.json")
    assert not ignore.excludes("src/secrets/a")  # anchored at the root, as Docker's


def _kedro_project(root: Path, source_dir: str) -> Path:
    """_project with its package in ``source_dir`` (pyproject.toml's [tool.kedro] source_dir)."""
    project = _project(root)
    target = project / source_dir / "demo_pkg"
    if target != project / "src" / "demo_pkg":
        target.parent.mkdir(parents=True, exist_ok=True)
        (project / "src" / "demo_pkg").rename(target)
        (project / "src").rmdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "demo"\n[tool.kedro]\npackage_name = "demo_pkg"\nproject_name = "demo"\n'
        f'kedro_init_version = "1.0.0"\nsource_dir = "{source_dir}"\n')
    return project


@pytest.mark.parametrize(("source_dir", "package_in_archive"),
                         [(".", "demo_pkg"), ("lib/python", "lib/python/demo_pkg")])
def test_a_package_outside_src_travels_where_the_step_imports_it_from(
        tmp_path: Path, source_dir: str, package_in_archive: str) -> None:
    import subprocess
    import sys

    project = _kedro_project(tmp_path / "p", source_dir)
    archive = build_archive(project, "demo_pkg")
    assert f"{package_in_archive}/nodes.py" in archive.files and not any(f.startswith("src/") for f in archive.files)
    directory, _ = fetch_code(upload_archive(archive, str(tmp_path / "root")), cache=tmp_path / "cache")
    # The step bootstraps the unpacked archive with Kedro: its package is the one imported.
    script = ("import sys; from kedro.framework.startup import bootstrap_project; "
              "from kvx_runtime.code_upload import check_package_from_archive; "
              "bootstrap_project(sys.argv[1]); check_package_from_archive(__import__('pathlib').Path(sys.argv[1]), "
              "'demo_pkg'); import demo_pkg.nodes; print(demo_pkg.nodes.__file__)")
    done = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str((directory / package_in_archive / "nodes.py").resolve())


def test_the_step_refuses_to_run_the_images_package_instead_of_the_archives(tmp_path: Path, monkeypatch) -> None:
    from kvx_runtime.code_upload import check_package_from_archive

    image = tmp_path / "image" / "src"
    (image / "kvx_shadow_pkg").mkdir(parents=True)
    (image / "kvx_shadow_pkg" / "__init__.py").write_text("")
    code = tmp_path / "code"
    (code / "kvx_shadow_pkg").mkdir(parents=True)  # packed where sys.path does not look
    (code / "kvx_shadow_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(code / "src"))
    monkeypatch.syspath_prepend(str(image))
    with pytest.raises(ConfigError, match="not from the code archive") as refused:
        check_package_from_archive(code, "kvx_shadow_pkg")
    assert refused.value.exit_code == ExitCode.USAGE
    monkeypatch.syspath_prepend(str(code))
    check_package_from_archive(code, "kvx_shadow_pkg")


def test_a_package_that_is_not_in_source_dir_is_refused_at_pack_time(tmp_path: Path) -> None:
    project = _kedro_project(tmp_path, "src")
    (project / "pyproject.toml").write_text(
        (project / "pyproject.toml").read_text().replace('source_dir = "src"', 'source_dir = "lib"'))
    with pytest.raises(ConfigError, match="is not in .*lib/demo_pkg") as refused:
        build_archive(project, "demo_pkg")
    assert refused.value.exit_code == ExitCode.USAGE
    (project / "pyproject.toml").write_text(
        (project / "pyproject.toml").read_text().replace('source_dir = "lib"', f'source_dir = "{project}/src"'))
    with pytest.raises(ConfigError, match="is absolute"):
        build_archive(project, "demo_pkg")


def test_dotenv_and_credentials_files_never_travel_and_nested_gitignores_count(tmp_path: Path) -> None:
    project = _project(tmp_path)
    for name in ("conf/base/.env", "conf/base/.env.production", "src/demo_pkg/.env", "conf/base/deep/credentials.yml",
                 "conf/cloud/sub/credentials/key.json", "conf/base/deep/Credentials.yaml",
                 "src/demo_pkg/generated/a.py", "src/demo_pkg/scratch.local.py", "src/demo_pkg/keep.local.py",
                 "conf/base/build/out.yml", "conf/base/build/kept.yml", "src/demo_pkg/sub/notes.txt",
                 "src/demo_pkg/sub/code.py", "conf/base/catalog.yml"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x\n")
    (project / ".gitignore").write_text("*.tmp\nbuild/\n")
    (project / "src" / "demo_pkg" / ".gitignore").write_text("generated/\n*.local.py\n!keep.local.py\n")
    (project / "src" / "demo_pkg" / "sub" / ".gitignore").write_text("*.txt\n")
    (project / "conf" / "base" / "build").mkdir(exist_ok=True)
    (project / "conf" / "base" / "build" / ".gitignore").write_text("!kept.yml\n")  # in an ignored folder: unread
    assert build_archive(project, "demo_pkg").files == (
        "conf/base/catalog.yml", "conf/base/parameters.yml", "conf/cloud/parameters.yml", "pyproject.toml",
        "src/demo_pkg/.gitignore", "src/demo_pkg/__init__.py", "src/demo_pkg/keep.local.py", "src/demo_pkg/nodes.py",
        "src/demo_pkg/sub/.gitignore", "src/demo_pkg/sub/code.py")


def _stored(data: bytes, tmp_path: Path) -> str:
    """``data`` stored as a code archive under its own digest: what a step would fetch."""
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "kvx-code").mkdir(exist_ok=True)
    (tmp_path / "kvx-code" / f"{digest}.tar.gz").write_bytes(data)
    return f"{tmp_path}/kvx-code/{digest}.tar.gz#sha256={digest}"


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def test_a_damaged_or_foreign_archive_is_one_clear_line_with_exit_2(tmp_path: Path) -> None:
    archive = build_archive(_project(tmp_path / "p"), "demo_pkg")
    tar = gzip.decompress(archive.data)
    with tarfile.open(fileobj=io.BytesIO(tar)) as opened:
        last = opened.getmembers()[-1]
    manifest = json.dumps({"format": 1, "package": "demo_pkg", "requirements_sha256": "0"}).encode()
    listed = json.dumps({"format": 1, "package": "demo_pkg", "files": {"a": hashlib.sha256(b"1").hexdigest()}})
    cases = {
        "not a complete gzip file": [b"<html>not an archive</html>", archive.data[: len(archive.data) // 2]],
        "not a complete tar file": [gzip.compress(b"hello world" * 10),
                                    gzip.compress(tar[: last.offset_data + 3])],  # cut inside a member
        # Cut at a member's boundary: a shorter tar, complete to tarfile.
        "not the one its manifest lists": [gzip.compress(tar[: last.offset])],
        "is not JSON": [gzip.compress(_tar([(".kvx-code.json", b"{not json")]))],
        "lists no files": [gzip.compress(_tar([(".kvx-code.json", manifest)]))],  # an older kvx-runtime's
        "another sha256": [gzip.compress(_tar([(".kvx-code.json", listed.encode()), ("a", b"2")]))],
        "both as a file and as a folder": [gzip.compress(_tar([(".kvx-code.json", manifest), ("a", b"1"),
                                                               ("a/b", b"2")]))],
        "twice": [gzip.compress(_tar([(".kvx-code.json", listed.encode()), ("a", b"1"), ("a", b"1")]))],
        "no kvx-runtime manifest": [gzip.compress(_tar([("a", b"1")]))],
    }
    for index, (message, damaged) in enumerate((m, d) for m, ds in cases.items() for d in ds):
        cache = tmp_path / f"cache{index}"
        with pytest.raises(CodeRejected, match=message) as refused:
            fetch_code(_stored(damaged, tmp_path), cache=cache)
        assert refused.value.exit_code == ExitCode.USAGE and "\n" not in str(refused.value)
        assert not cache.exists() or [path.name for path in cache.iterdir()] == [], message  # nothing unpacked


def test_an_archive_that_unpacks_to_too_much_is_refused_before_it_is_made(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    archive = build_archive(_project(tmp_path / "p"), "demo_pkg")
    reference = upload_archive(archive, str(tmp_path / "root"))
    monkeypatch.setenv("KVX_CODE_MAX_UNPACKED_BYTES", "1000")
    with pytest.raises(CodeRejected, match="unpacks to more than 1000 bytes") as caught:
        fetch_code(reference, cache=tmp_path / "cache")
    assert caught.value.exit_code == ExitCode.USAGE
    monkeypatch.delenv("KVX_CODE_MAX_UNPACKED_BYTES")
    assert fetch_code(reference, cache=tmp_path / "cache")[1]["package"] == "demo_pkg"
    # Data after the gzip stream's end is not ours either.
    from kvx_runtime.code_upload import _gunzip

    with pytest.raises(CodeRejected, match="data after its end"):
        _gunzip(gzip.compress(b"x" * 10) + b"trailing", 10**6)


def test_scripts_stay_executable_and_links_to_project_files_travel(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    script = project / "src" / "demo_pkg" / "run.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    script.chmod(0o755)
    (project / "src" / "demo_pkg" / "shared.py").symlink_to(project / "src" / "demo_pkg" / "nodes.py")
    outside = tmp_path / "outside.py"
    outside.write_text("SECRET = 1\n")
    (project / "src" / "demo_pkg" / "elsewhere.py").symlink_to(outside)
    archive = build_archive(project, "demo_pkg")
    assert "src/demo_pkg/shared.py" in archive.files and "src/demo_pkg/elsewhere.py" not in archive.files
    directory, _ = fetch_code(upload_archive(archive, str(tmp_path / "root")), cache=tmp_path / "cache")
    assert os.access(directory / "src" / "demo_pkg" / "run.sh", os.X_OK)
    assert not os.access(directory / "src" / "demo_pkg" / "nodes.py", os.X_OK)
    assert (directory / "src" / "demo_pkg" / "shared.py").read_text() == "def f():\n    return 1\n"
    assert not (directory / "src" / "demo_pkg" / "shared.py").is_symlink()


#: The body of a PEM block (base64, 64 characters a line), as in a real key file.
KEY_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nVJTUt9Us8cKjMzEfYyjiWA4R4/M2bS1GB4t7NXp98C3S\n"


@pytest.mark.parametrize(("name", "content", "what"), [
    ("src/demo_pkg/sa.json", json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "1",
                                          "private_key": f"-----BEGIN PRIVATE KEY-----\n{KEY_BODY}"
                                                         "-----END PRIVATE KEY-----\n",
                                          "client_email": "sa@p.iam.gserviceaccount.com"}, indent=2),
     "a Google service-account key"),
    ("conf/base/adc.json", json.dumps({"client_id": "c", "client_secret": "s", "refresh_token": "1//r",
                                        "type": "authorized_user"}), "Google user credentials"),
    ("src/demo_pkg/certs/server.key", f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}-----END RSA PRIVATE KEY-----\n",
     "a PEM private key"),
    ("src/demo_pkg/settings.py",
     f'KEY = """-----BEGIN EC PRIVATE KEY-----\n{KEY_BODY}-----END EC PRIVATE KEY-----"""\n', "a PEM private key"),
    ("conf/base/signing.asc", "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: 1\n\n" + KEY_BODY
     + "=abcd\n-----END PGP PRIVATE KEY BLOCK-----\n", "a PGP private key"),
    ("src/demo_pkg/deploy.ppk", "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: k\n"
     "Public-Lines: 2\nAAAA\nBBBB\nPrivate-Lines: 1\nCCCC\n", "a PuTTY private key"),
])
def test_a_private_key_in_the_code_stops_the_upload_naming_it(tmp_path: Path, name: str, content: str,
                                                               what: str) -> None:
    project = _project(tmp_path)
    (project / name).parent.mkdir(parents=True, exist_ok=True)
    (project / name).write_text(content)
    with pytest.raises(ConfigError) as error:
        build_archive(project, "demo_pkg")
    assert error.value.exit_code == ExitCode.USAGE
    assert f"{name} ({what})" in str(error.value) and ".dockerignore" in str(error.value)
    assert "MIIE" not in str(error.value) and "1//r" not in str(error.value)
    assert str(error.value).count(name) == 1
    (project / ".gitignore").write_text(f"*.tmp\n{name}\n")  # left out: the upload goes on
    assert name not in build_archive(project, "demo_pkg").files


def test_public_keys_and_certificates_travel(tmp_path: Path) -> None:
    project = _project(tmp_path)
    package = project / "src" / "demo_pkg"
    (package / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (package / "id.pub").write_text("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n")
    (project / "conf" / "base" / "sa_email.json").write_text('{"type": "service_account_email", "email": "x"}')
    # Code and docs that mention a key's header hold no key.
    (package / "keys.py").write_text('def is_key(text):\n    return text.startswith("-----BEGIN PRIVATE KEY-----")\n'
                                     'END = "-----END PRIVATE KEY-----"\n')
    (package / "README.md").write_text("Never commit a file starting with -----BEGIN RSA PRIVATE KEY-----.\n")
    files = build_archive(project, "demo_pkg").files
    assert {"src/demo_pkg/ca.pem", "src/demo_pkg/id.pub", "conf/base/sa_email.json", "src/demo_pkg/keys.py",
            "src/demo_pkg/README.md"} <= set(files)


def test_looking_for_keys_takes_one_pass_over_a_file() -> None:
    """Each marker many times over in 1 MiB: the shape that made a pattern like "A.*B" rescan
    the rest of the file at each A (minutes; the suite's per-test timeout stops it)."""
    from kvx_runtime.code_upload import _private_key_in

    for marker in (b'"private_key",', b'"type": "service_account",', b'"refresh_token",',
                   b"-----BEGIN PRIVATE KEY-----\n", b"-----BEGIN PGP PRIVATE KEY BLOCK-----",
                   b"PuTTY-User-Key-File-3: x\n"):
        assert _private_key_in(marker * ((1 << 20) // len(marker))) is None, marker
