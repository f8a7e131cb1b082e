"""Mail to staff on a real SMTP server: transactional headers, DKIM, the plain envelope."""

from __future__ import annotations

from pathlib import Path

from mailer.compose.dkim import generate_keypair, signer_for
from mailer.compose.staffmail import build_staff_message, staff_message_id
from mailer.delivery.policy import Outcome
from mailer.staff.transport import Outgoing, send_now
from tests.compliance import assert_compliant
from tests.factories import NOW, make_settings, server_settings
from tests.smtp_server import FaultServer

pytest_plugins = ["tests.smtp_server"]


async def test_staff_mail_is_signed_transactional_and_sent_from_the_plain_envelope(
    smtp_server: FaultServer, tmp_path: Path
) -> None:
    key = tmp_path / "dkim.pem"
    generate_keypair(key)
    settings = server_settings(
        "sqlite:///:memory:",
        smtp_server,
        smtp={"verp": True, "envelope_from": "bounces@news.example.org"},
        dkim={"domain": "news.example.org", "selector": "s1", "private_key_file": str(key)},
    )
    data = build_staff_message(
        settings,
        to="editor@news.example.org",
        subject="Report: issue 7 — sent 10 of 10",
        text="Sent 10.\n",
        html="<p>Sent 10.</p>",
        message_id=staff_message_id(settings, "report"),
        now=NOW,
    )
    results = await send_now(
        settings,
        [Outgoing("editor@news.example.org", data), Outgoing("desk@news.example.org", data)],
        sign=signer_for(settings),
    )
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    received = smtp_server.received_for("editor@news.example.org")[0]
    assert received.envelope_from == "bounces@news.example.org"  # never a VERP address
    msg = assert_compliant(received.data, settings, list_mail=False)
    assert msg["DKIM-Signature"] is not None
    assert msg["List-Unsubscribe"] is None and msg["List-Id"] is None
    assert msg["Subject"] == "Report: issue 7 — sent 10 of 10"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative"


async def test_a_relay_that_refuses_is_a_result_not_an_exception(
    smtp_server: FaultServer,
) -> None:
    settings = server_settings("sqlite:///:memory:", smtp_server)
    smtp_server.script("editor@news.example.org", ["550 5.1.1 no such user"])
    data = build_staff_message(
        settings,
        to="editor@news.example.org",
        subject="alert",
        text="x\n",
        html=None,
        message_id=staff_message_id(settings, "alert"),
        now=NOW,
    )
    [result] = await send_now(settings, [Outgoing("editor@news.example.org", data)], sign=None)
    assert result.outcome is Outcome.BOUNCED and result.code == 550


def test_the_footer_goes_inside_the_body_of_a_whole_page() -> None:
    settings = make_settings()
    data = build_staff_message(
        settings,
        to="editor@news.example.org",
        subject="Review",
        text="x\n",
        html="<html><body><p>The digest</p></body></html>",
        message_id=staff_message_id(settings, "review"),
        now=NOW,
    )
    html = assert_compliant(data, settings, list_mail=False).get_body(("html",))
    assert html is not None
    page = html.get_content()
    assert page.index("Privacy policy") < page.index("</body>") < page.index("</html>")
