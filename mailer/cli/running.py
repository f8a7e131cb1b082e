"""``mailer run``, ``mailer worker`` and ``mailer web``: the long-running service, whole or in
parts."""

from __future__ import annotations

from dataclasses import replace

import click

from mailer.cli.context import (
    PROCESSES,
    Context,
    out,
    pass_ctx,
    signer,
    started,
    waiting,
    web_line,
)
from mailer.clock import now
from mailer.config.load import with_processes
from mailer.errors import MailerError
from mailer.issues import progress
from mailer.preflight import preflight


@click.command()
@click.option("--host", default=None, help="Listen address (default: [web].host).")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Listen port (default: [web].port)."
)
@pass_ctx
def web(ctx: Context, host: str | None, port: int | None) -> None:
    """Serve the subscriber web app: sign-up, confirm, unsubscribe, preferences, archive."""
    from mailer.web.sender import SmtpConfirmationSender
    from mailer.web.server import serve

    settings = ctx.settings
    web_settings = replace(
        settings.web, host=host or settings.web.host, port=port or settings.web.port
    )
    settings = replace(settings, web=web_settings)
    sender = SmtpConfirmationSender(settings, sign=signer(settings))
    sock = preflight(settings, ("secret", "database", "web"))
    assert sock is not None
    line = f"mailer web: {web_line(settings, sock)}"
    with sock:
        serve(settings, ctx.engine(), sender, sock=sock, on_started=lambda: started(line))


@click.command()
@click.option("--no-web", is_flag=True, help="Leave the web app to `mailer web` elsewhere.")
@pass_ctx
def run(ctx: Context, no_web: bool) -> None:
    """Scheduler, delivery worker and web app, until SIGTERM or Ctrl-C (with [smtp].processes
    > 1, more processes deliver beside it)."""
    from mailer.delivery.sending import serve
    from mailer.issues.schedule import local_time, upcoming
    from mailer.service import Parts

    settings = ctx.settings
    sock = preflight(settings, ("secret", "database", "smtp", *(() if no_web else ("web",))))
    listening = "web app off (--no-web)" if sock is None else web_line(settings, sock)
    zone = settings.site.timezone

    def on_started() -> None:
        slots = upcoming(settings.digests, now())
        listed = ", ".join(
            [f"{d.key} {local_time(slot, zone, year=False)}" for d, slot in slots]
            + [f"{d.key} on arrival" for d in settings.digests if d.on_arrival]
        )
        started(f"mailer run: {listening}; next: {listed or 'no digest is scheduled'}")

    try:
        serve(
            ctx.engine(),
            settings,
            Parts(web=not no_web),
            drain=False,
            sign=signer(settings),
            web_socket=sock,
            on_started=on_started,
            on_wait=waiting,
        )
    finally:
        if sock is not None:
            sock.close()


@click.command()
@click.option("--drain", is_flag=True, help="Exit when nothing is due.")
@PROCESSES
@pass_ctx
def worker(ctx: Context, drain: bool, processes: int | None) -> None:
    """Deliver due mail only (no scheduler, no web), until SIGTERM or Ctrl-C."""
    from mailer.delivery.sending import serve
    from mailer.service import Parts

    settings = with_processes(ctx.settings, processes)
    preflight(settings, ("secret", "database", "smtp"))
    since = now()
    sign = signer(settings)
    report = serve(
        ctx.engine(),
        settings,
        Parts(scheduler=False, web=False),
        drain=drain,
        sign=sign,
        on_wait=waiting,
    )
    out.print(report.summary())
    if drain:
        from mailer.staff.rounds import flush_outbox

        flush_outbox(ctx.engine(), settings, now=now(), sign=sign)  # reports, alerts meanwhile
        left = progress.unfinished(ctx.engine(), since=since)
        if left is not None:
            raise MailerError(left.describe(settings.site.timezone, now()))
