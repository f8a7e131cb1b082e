"""A test copy: the message a reader would receive, for staff to look at in their own inbox.

It is built by ``messages.whole_message``, as ``reference_message`` builds the reader's message
(the same render, the same header order, the same MIME shape), with these differences only:

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

from mailer.compose.messages import shown_topics, subject_for, whole_message
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.errors import RenderError
from mailer.models import IssueContent
from mailer.subscribers.links import inert_links_for

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
    inert = inert_links_for(settings.site, uid)
    return whole_message(
        settings,
        content,
        shown,
        to=to,
        message_id=message_id,
        subject=subject_prefix + subject_for(settings, content, shown, renderer),
        unsubscribe=inert.unsubscribe,
        preferences=inert.preferences,
        now=now,
        renderer=renderer,
    )
