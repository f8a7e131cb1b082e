"""A test copy: the message a reader would receive, for staff to look at in their own inbox.

It is built the way ``messages.reference_message`` builds the reader's message (the same
render, the same header order, the same MIME shape), with these differences only:

- To is the address the copy goes to (a ``digest preview`` file keeps the reader's);
- Subject starts with ``subject_prefix`` (``[TEST] `` for one that is sent);
- Message-ID is a fresh one on the site's domain, Date the moment it is built;
- every personal link (the unsubscribe and preferences links of both parts, and
  List-Unsubscribe) is the reader's inert one (``subscribers.links.inert_links_for``): it opens
  a page that says this is a test copy, and a POST to it (one-click included) changes nobody.

List-Unsubscribe-Post, List-Id, Feedback-ID and everything else stay as the reader gets them,
so a test copy shows what a mailbox provider does with the real one (the one-click button
included). ``tests/test_test_sends.py`` proves "the same except these" against
``DigestComposer.message``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from email.message import EmailMessage

from mailer.compose.messages import (
    POLICY,
    PersonalHeaders,
    add_headers,
    attach_parts,
    check_address,
    check_message_id,
    date_value,
    list_unsubscribe_value,
    render_digest,
    shown_topics,
)
from mailer.compose.rendering import LinkView, Renderer
from mailer.config.settings import Settings
from mailer.errors import RenderError
from mailer.models import IssueContent
from mailer.subscribers.links import archive_url, inert_links_for

TEST_PREFIX = "[TEST] "


def build_test_copy(
    settings: Settings,
    content: IssueContent,
    *,
    uid: str,
    topics: Iterable[str],
    to: str,
    message_id: str,
    now: datetime,
    renderer: Renderer,
    subject_prefix: str = TEST_PREFIX,
) -> bytes:
    """The RFC 5322 bytes (CRLF) of the copy of ``content`` that the reader ``uid`` with
    ``topics`` would receive, addressed to ``to``, with inert links.

    RenderError if no article of the issue is in ``topics`` (the reader would get nothing).
    """
    shown = shown_topics(settings, content, topics)
    if not shown:
        raise RenderError("no article of the issue is in the reader's topics", template="email/*")
    site = settings.site
    inert = inert_links_for(site, uid)
    view = LinkView(
        unsubscribe=inert.unsubscribe,
        preferences=inert.preferences,
        privacy=site.privacy_policy_url,
        archive=archive_url(site, content.issue_id),
        home=site.base_url + "/",
        personal=True,
    )
    html, text = render_digest(settings, content, shown, view, renderer)
    msg = EmailMessage(policy=POLICY)
    personal = PersonalHeaders(
        to=check_address(to),
        date=date_value(now),
        message_id=check_message_id(message_id),
        list_unsubscribe=list_unsubscribe_value(site, inert.unsubscribe),
    )
    add_headers(
        msg, settings, subject_prefix + content.subject, personal, raw=False, list_headers=True
    )
    attach_parts(msg, text, html)
    return msg.as_bytes()
