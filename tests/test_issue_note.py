"""An issue's subject made from its articles, and the editor's note: the ``note-<digest>.txt``
file read when an issue is made, and ``mailer issues note`` while it has not started sending.
Real databases (SQLite and PostgreSQL) and the real command line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailer.cli import cli, main
from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.config.load import load_settings
from mailer.config.settings import Settings
from mailer.content.store import upsert_articles
from mailer.db.schema import articles, issues
from mailer.issues.progress import load_content
from mailer.issues.review import open_due_reviews
from mailer.issues.review_mail import compose_review_mail
from tests.factories import (
    ALERTS,
    BASE_CONFIG,
    NOW,
    SECRET,
    make_article,
    make_issue,
    make_subscriber,
    write_config,
)

WEEKLY = {
    **BASE_CONFIG["digests"][0],
    "subject": "{{ lead.title }}{% if more %}, and {{ more }} more{% endif %}",
}
REVIEWED = WEEKLY | {"review_minutes": 60}


def settings_at(tmp_path: Path, db_url: str, *digests: dict[str, object]) -> Settings:
    """Settings read from a real config file in ``tmp_path`` (the note file sits beside it)."""
    path = write_config(tmp_path / "mailer.toml", db_url, digests=list(digests) or [WEEKLY])
    return load_settings(path, env={"MAILER_SECRET_KEY": SECRET})


def stock(engine: sa.Engine, *titles: str, topic: str = "base-alerts") -> None:
    """Articles in the order given, the first the newest (an issue's lead)."""
    articles = [
        make_article(title=t, topic=topic, published_at=NOW - timedelta(hours=2 + i))
        for i, t in enumerate(titles)
    ]
    upsert_articles(engine, articles, now=NOW - timedelta(hours=1))


def row(engine: sa.Engine, issue_id: int) -> sa.Row[tuple[str, str | None, str | None]]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(issues.c.subject, issues.c.note, issues.c.note_by).where(
                issues.c.id == issue_id
            )
        ).one()
    return found


def run(config: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["--config", str(config), *args], input=stdin, catch_exceptions=False
    )


def refused(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """What ``mailer`` says on stderr for a refused command (one line, a non-zero exit)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), *args])
    assert exit_info.value.code != 0
    return " ".join(capsys.readouterr().err.split())


def test_the_subject_is_made_from_the_articles_the_issue_takes(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    settings = settings_at(tmp_path, db_url)
    make_subscriber(engine)
    stock(engine, "Gate 2 opens early Friday", "Road work on Holcomb", "Pool closed Monday")
    made = make_issue(engine, settings)
    assert made.articles == 3
    assert row(engine, made.issue_id).subject == "Gate 2 opens early Friday, and 2 more"
    # The next slot finds nothing new: an empty issue, still with a subject staff can read.
    empty = make_issue(engine, settings, at=NOW + timedelta(days=7))
    assert empty.status == "empty"
    assert row(engine, empty.issue_id).subject == (
        "Weekly digest, Friday, 27 November 2026: no new articles"
    )


def test_the_note_file_goes_into_the_next_issue_of_its_digest_once(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    settings = settings_at(tmp_path, db_url, WEEKLY, ALERTS | {"subject": "Base alert"})
    make_subscriber(engine)
    note_file = tmp_path / "note-weekly.txt"
    note_file.write_text("Welcome to the new look.\r\n\r\nTell us what you think.\n")
    stock(engine, "Gate 2 opens early Friday")
    # An alert made first does not take the weekly digest's note.
    alert = make_issue(engine, settings, "alerts", at=NOW - timedelta(minutes=10))
    assert alert.articles == 1 and row(engine, alert.issue_id).note is None
    assert note_file.exists()

    stock(engine, "Holiday market Saturday", topic="local-events")
    made = make_issue(engine, settings)
    stored = row(engine, made.issue_id)
    assert stored.note == "Welcome to the new look.\n\nTell us what you think."
    assert stored.note_by == "file note-weekly.txt"
    assert not note_file.exists()
    kept = tmp_path / f"note-weekly.txt.issue-{made.issue_id}"
    assert kept.read_text().startswith("Welcome to the new look.")
    # Readers get it at the top; the next issue does not repeat it.
    with engine.connect() as conn:
        content = load_content(conn, made.issue_id, settings)
    html, text = DigestComposer(settings, content, renderer=Renderer()).preview(["local-events"])
    assert "From the editor" in html and "Tell us what you think." in html
    assert text.index("FROM THE EDITOR") < text.index("Holiday market Saturday\n=")
    stock(engine, "Pool closed Monday", topic="local-events")
    later = make_issue(engine, settings, at=NOW + timedelta(days=7))
    assert later.articles == 1 and row(engine, later.issue_id).note is None


def test_an_empty_note_file_is_no_note_and_stays(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    settings = settings_at(tmp_path, db_url)
    (tmp_path / "note-weekly.txt").write_text("\n  \n")
    stock(engine, "Gate 2 opens early Friday")
    made = make_issue(engine, settings)
    assert row(engine, made.issue_id).note is None
    assert (tmp_path / "note-weekly.txt").exists()


def test_issues_note_sets_shows_and_clears_the_note_until_the_issue_sends(
    engine: sa.Engine,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    config = write_config(tmp_path / "mailer.toml", db_url, digests=[REVIEWED])
    settings = load_settings(config, env={"MAILER_SECRET_KEY": SECRET})
    make_subscriber(engine)
    stock(engine, "Gate 2 opens early Friday", "Road work on Holcomb")
    renderer = Renderer()
    (issue_id,) = open_due_reviews(
        engine,
        settings,
        now=NOW - timedelta(minutes=60),
        render_subject=renderer.render_subject,
        renderer=renderer,
    )
    ident = str(issue_id)

    said = run(
        config, "issues", "note", ident, "Hello <readers>.\n\nSecond paragraph.", "--by", "ana"
    )
    assert said.exit_code == 0, said.output
    assert said.output == f"issue {issue_id}: note of 4 words set by ana\n"
    shown = run(config, "issues", "show", ident).output
    assert "  editor's note (by ana):\n    Hello <readers>.\n\n    Second paragraph.\n" in shown
    assert row(engine, issue_id).subject == "Gate 2 opens early Friday, and 1 more"

    with engine.connect() as conn:
        mail = compose_review_mail(
            conn, settings, settings.digests[0], issue_id, renderer, now=NOW - timedelta(minutes=59)
        )
    assert "Editor's note (by ana): shown at the top of the issue below." in mail.text
    assert "FROM THE EDITOR\n\nHello <readers>.\n\nSecond paragraph." in mail.text
    assert "Hello &lt;readers&gt;." in mail.html

    # Dropping the lead makes the subject again from what the issue keeps.
    with engine.connect() as conn:
        lead_id = conn.execute(
            sa.select(articles.c.id).where(articles.c.title == "Gate 2 opens early Friday")
        ).scalar_one()
    assert run(config, "issues", "drop-article", ident, str(lead_id)).exit_code == 0
    assert row(engine, issue_id).subject == "Road work on Holcomb"

    from_stdin = run(config, "issues", "note", ident, "-", "--by", "bo", stdin="From stdin.\n")
    assert from_stdin.exit_code == 0 and row(engine, issue_id).note == "From stdin."

    for args, message in (
        ((ident,), "give the note's TEXT, or --clear to remove the note"),
        ((ident, "text", "--clear"), "give the note's TEXT, or --clear to remove the note"),
        ((ident, "   "), "the note is empty (use --clear to remove a note)"),
        ((ident, "x" * 2001), "the note has 2001 characters; at most 2000"),
        (("999", "text"), "no issue 999"),
    ):
        assert message in refused(config, capsys, "issues", "note", *args)

    cleared = run(config, "issues", "note", ident, "--clear", "--by", "ana")
    assert cleared.output == f"issue {issue_id}: note removed by ana\n"
    assert row(engine, issue_id).note is None
    assert "editor's note" not in run(config, "issues", "show", ident).output

    # Once it sends, some readers may have it: a note then is refused, naming the status.
    assert run(config, "issues", "approve", ident, "--by", "ana").exit_code == 0
    with engine.begin() as conn:
        conn.execute(issues.update().where(issues.c.id == issue_id).values(status="sending"))
    late = refused(config, capsys, "issues", "note", ident, "Too late")
    assert (
        f"error: issue {issue_id} is sending: only an issue in review, approved or held can be"
        " given a note (once it sends, some readers have it already)"
    ) in late
