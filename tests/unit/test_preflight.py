"""What check-config and serve check on the machine: placeholders, directories, files."""

from __future__ import annotations

from pathlib import Path

from relayd import config, preflight
from relayd.preflight import ERROR, WARNING
from tests.helpers import CLIENT_ID, REPO, TENANT_ID

EXAMPLE = REPO / "config" / "relayd.example.yaml"


def settings_for(tmp_path: Path, **sections: dict | list) -> config.Settings:
    document = {
        "spool": {"directory": str(tmp_path / "spool")},
        "upstream": {"mailbox": "relay@contoso.com"},
        "oauth": {
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "token_cache": str(tmp_path / "tokens" / "cache.json"),
        },
    }
    for name, values in sections.items():  # a list (routes) replaces, a section merges
        merged = values if isinstance(values, list) else {**document.get(name, {}), **values}
        document[name] = merged
    return config.from_mapping(document, "test.yaml", environ={})


def test_a_clean_configuration_has_no_findings(tmp_path: Path) -> None:
    assert preflight.check(settings_for(tmp_path), serving=True) == []


def test_the_example_files_placeholders_are_an_error_to_serve_and_a_warning_to_check() -> None:
    settings = config.load(EXAMPLE, environ={})
    served = preflight.check(settings, serving=True)
    placeholder = [f for f in served if "placeholder" in f.problem]
    assert [f.severity for f in placeholder] == [ERROR]
    assert placeholder[0].key == "oauth.tenant_id, oauth.client_id, upstream.mailbox"
    checked = [f for f in preflight.check(settings, serving=False) if "placeholder" in f.problem]
    assert [f.severity for f in checked] == [WARNING]


def test_placeholders_do_not_matter_to_the_maildir_transport(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        upstream={"transport": "maildir", "mailbox": "relay@example.com"},
        oauth={"tenant_id": preflight.PLACEHOLDER_GUID},
    )
    assert preflight.placeholder_keys(settings) == []


def test_one_placeholder_left_is_named(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, upstream={"send_as": ["alerts@mail.example.com"]})
    assert preflight.placeholder_keys(settings) == ["upstream.send_as"]


def test_a_client_secret_file_readable_by_others_is_a_warning(tmp_path: Path) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(0o644)
    settings = settings_for(tmp_path, oauth={"client_secret_file": str(secret)})
    (finding,) = preflight.check(settings, serving=True)
    assert (finding.severity, finding.key) == (WARNING, "oauth.client_secret_file")
    assert f"chmod 600 {secret}" in finding.problem
    secret.chmod(0o640)  # group-readable (root:relayd) is how the unit hands it over
    assert preflight.check(settings, serving=True) == []


def test_a_spool_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = settings_for(tmp_path, spool={"directory": str(tmp_path / "file" / "spool")})
    (finding,) = preflight.check(settings, serving=False)
    assert (finding.severity, finding.key) == (ERROR, "spool.directory")
    assert (
        finding.problem
        == f"cannot create {tmp_path}/file/spool: {tmp_path}/file is not a directory"
    )


def test_a_spool_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("")
    (finding,) = preflight.check(settings_for(tmp_path), serving=False)
    assert finding.problem == f"{tmp_path}/spool is not a directory"


def test_the_maildir_is_checked_for_the_maildir_transport(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = settings_for(
        tmp_path, upstream={"transport": "maildir", "maildir": str(tmp_path / "file" / "md")}
    )
    (finding,) = preflight.check(settings, serving=True)
    assert finding.key == "upstream.maildir"


def test_errors_come_first(tmp_path: Path) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(0o644)
    (tmp_path / "spool").write_text("")
    settings = settings_for(tmp_path, oauth={"client_secret_file": str(secret)})
    findings = preflight.check(settings, serving=True)
    assert [f.severity for f in findings] == [ERROR, WARNING]
    assert preflight.errors(findings) == findings[:1]
