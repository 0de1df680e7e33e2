"""The relay recipes of docs/relays.md (examples/relays/*.yaml) are accepted by
``dispatcher check-config`` as they are; ``smtp.start_tls`` does what config.example.yaml
says it does, checked against the test server with ``check-config --connect``."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from smtpserver import FaultyServer
from test_check_connect import NO_CA_ENV
from test_dispatcher import dispatcher
from test_run_relays import dispatcher_lines, smtp, write_yaml

from dispatcher.cli import main

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "examples" / "relays").glob("*.yaml"))
SECRETS = ["SES_SMTP_USERNAME", "SES_SMTP_PASSWORD", "SENDGRID_API_KEY", "MAILGUN_SMTP_PASSWORD",
           "POSTMARK_SMTP_ACCESS_KEY", "POSTMARK_SMTP_SECRET_KEY"]


def test_every_recipe_is_on_the_relays_page() -> None:
    page = (ROOT / "docs" / "relays.md").read_text(encoding="utf-8")
    assert len(RECIPES) >= 8
    assert [r.name for r in RECIPES if f'--8<-- "examples/relays/{r.name}"' not in page] == []


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_check_config_accepts_the_recipe(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in SECRETS:
        monkeypatch.setenv(name, "secret-from-the-environment")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))  # postfix.yaml's ca_file
    monkeypatch.chdir(tmp_path)
    code = main(["check-config", str(recipe)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"{recipe}: ok (relay "), out
    assert "secret-from-the-environment" not in out + err


# -- smtp.start_tls, as config.example.yaml explains it -------------------------------------


@pytest.fixture(scope="module")
def server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)  # a CA nobody trusts: "self-signed"
    return context


@pytest.mark.parametrize(("start_tls", "relay_offers_starttls", "username", "outcome"), [
    (None, True, None, "not trusted"),      # null: offered STARTTLS is taken, and the certificate must verify
    (None, False, None, "plain"),           # null: not offered, no password: plain text
    (None, False, "user", "no STARTTLS"),   # null: not offered, a password: the run stops
    (True, False, None, "no STARTTLS"),     # true: required
    (False, True, None, "plain"),           # false: never, even when offered
])
async def test_start_tls_does_what_the_example_config_says(
    start_tls: bool | None, relay_offers_starttls: bool, username: str | None, outcome: str,
    server_context: ssl.SSLContext, tmp_path: Path
) -> None:
    server: dict[str, Any] = {"starttls_context": server_context} if relay_offers_starttls else {}
    if username:
        server["credentials"] = (username, "pw")
    async with FaultyServer(**server) as srv:
        section = smtp(srv.port, start_tls=start_tls)
        if username:
            section.update(username=username, password="pw")
        config = write_yaml(tmp_path / "relay.yaml", {"smtp": section})
        code, out, err = await dispatcher("check-config", str(config), "--connect", cwd=tmp_path, env=NO_CA_ENV)
    if outcome == "plain":
        assert code == 0, err
        assert "no TLS (plain text)" in out, out  # the session's own TLS state, not a guess
        return
    assert code == 2, out
    said = dispatcher_lines(err)
    expected = {"not trusted": "TLS certificate not trusted", "no STARTTLS": "does not offer STARTTLS"}[outcome]
    assert len(said) == 1 and expected in said[0], said
