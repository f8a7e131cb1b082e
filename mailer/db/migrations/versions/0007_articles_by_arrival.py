"""articles: taken by arrival, duplicate content refused, removal recorded

* ix_issue_articles_article (article_id, issue_id): an issue takes the articles its digest has
  not taken yet, a NOT EXISTS probe per candidate article into issue_articles (whose primary
  key starts with issue_id, so it cannot serve the probe).
* articles.text_key and articles.link_key, each under a unique index: the normalised text, and
  the canonical link under the normalised title. Unique indexes rather than constraints, so
  SQLite adds them without rebuilding the table. Existing rows are keyed here, first stored
  first: a later copy already stored keeps NULL keys (it stays, as it is in issues).
* articles.removed_at, removed_by, removed_from: `mailer articles remove`.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_issue_articles_article", "issue_articles", ["article_id", "issue_id"])
    op.add_column("articles", sa.Column("text_key", sa.String(64)))
    op.add_column("articles", sa.Column("link_key", sa.String(64)))
    op.add_column("articles", sa.Column("removed_at", sa.DateTime(timezone=True)))
    op.add_column("articles", sa.Column("removed_by", sa.String(200)))
    op.add_column("articles", sa.Column("removed_from", sa.Text()))
    _key_existing()
    op.create_index("ix_articles_text_key", "articles", ["text_key"], unique=True)
    op.create_index("ix_articles_link_key", "articles", ["link_key"], unique=True)


def _key_existing() -> None:
    # The keys are computed as new articles compute them (one definition, in mailer.content.article).
    from mailer.content.article import ParsedArticle

    conn = op.get_bind()
    table = sa.table(
        "articles",
        *(
            sa.column(name)
            for name in (
                "id",
                "guid",
                "topic",
                "title",
                "summary",
                "why_it_matters",
                "body",
                "link",
                "published_at",
                "text_key",
                "link_key",
            )
        ),
    )
    seen: set[tuple[str, str]] = set()
    updates = []
    rows = conn.execute(
        sa.select(
            table.c.id,
            table.c.guid,
            table.c.topic,
            table.c.title,
            table.c.summary,
            table.c.why_it_matters,
            table.c.body,
            table.c.link,
            table.c.published_at,
        ).order_by(table.c.id)
    )
    for row in rows:
        item = ParsedArticle(
            guid=row.guid,
            topic=row.topic,
            title=row.title,
            summary=row.summary or "",
            why_it_matters=row.why_it_matters or "",
            body=row.body or "",
            link=row.link,
            published_at=row.published_at,
        )
        keys = {}
        for name, key in (("text_key", item.text_key), ("link_key", item.link_key)):
            if key is not None and (name, key) not in seen:
                seen.add((name, key))
                keys[name] = key
        if keys:
            updates.append(
                {"b_id": row.id, "b_text": keys.get("text_key"), "b_link": keys.get("link_key")}
            )
    if updates:
        conn.execute(
            table.update()
            .where(table.c.id == sa.bindparam("b_id"))
            .values(text_key=sa.bindparam("b_text"), link_key=sa.bindparam("b_link")),
            updates,
        )


def downgrade() -> None:
    op.drop_index("ix_articles_link_key", table_name="articles")
    op.drop_index("ix_articles_text_key", table_name="articles")
    # Plain ALTER TABLE … DROP COLUMN (SQLite 3.35+): a batch rebuild of articles would drop the
    # table, and with foreign keys on, SQLite deletes its issue_articles rows with it.
    for name in ("removed_from", "removed_by", "removed_at", "link_key", "text_key"):
        op.execute(f"ALTER TABLE articles DROP COLUMN {name}")
    op.drop_index("ix_issue_articles_article", table_name="issue_articles")
