"""``mailer digest send`` and ``mailer worker --drain`` with DKIM signing, for the benchmarks.

The delivery path takes a signer (``Deliverer(sign=...)``, ``Service(sign=...)``), but while
the CLI does not pass one yet, ``bench/send.py --dkim`` runs the same two commands through this
file instead: the same library calls as ``mailer.cli``'s ``digest send`` and ``worker``, plus
``DkimSigner.from_settings(settings.dkim).sign``. Once the CLI signs by itself, ``send.py``
uses the real CLI (it checks ``mailer.cli`` for a signer).

Usage: ``python bench/_dkim_cli.py CONFIG send KEY`` or ``python bench/_dkim_cli.py CONFIG
worker``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from mailer.clock import now
from mailer.compose.dkim import DkimSigner
from mailer.compose.rendering import Renderer
from mailer.config.load import load_settings
from mailer.db.engine import check_schema, create_engine
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.issues.staff import open_issue
from mailer.service import Parts, Service


async def _deliver(engine, settings, issue_id, sign):  # type: ignore[no-untyped-def]
    async with SmtpPool(settings.smtp) as pool:
        return await Deliverer(engine, settings, pool, sign=sign).drain(issue_id=issue_id)


def main() -> None:
    config, command, *rest = sys.argv[1:]
    settings = load_settings(Path(config))
    if settings.dkim is None:
        raise SystemExit(f"{config}: no [dkim] table")
    sign = DkimSigner.from_settings(settings.dkim).sign
    engine = create_engine(settings.database.url)
    check_schema(engine)
    try:
        if command == "send":
            issue = open_issue(
                engine, settings, settings.digest(rest[0]), now=now(), renderer=Renderer()
            )
            print(f"issue {issue.issue_id} created: {issue.recipients} recipients", flush=True)
            totals = asyncio.run(_deliver(engine, settings, issue.issue_id, sign))
        else:
            service = Service(engine, settings, parts=Parts(scheduler=False, web=False), sign=sign)
            totals = asyncio.run(service.run(drain=True))
        print(f"sent {totals.counts.get('sent', 0)}", flush=True)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
