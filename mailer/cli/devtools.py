"""``mailer sink`` and ``mailer demo``: a capture SMTP server and the whole path on embedded
defaults, for trying the service out."""

from __future__ import annotations

from pathlib import Path

import click

from mailer.cli.context import out


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=1025, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("mail"),
    show_default=True,
)
def sink(host: str, port: int, out_dir: Path) -> None:
    """A local capture SMTP server: one .eml file per message received."""
    from mailer.devtools.sink import run_sink

    run_sink(
        host,
        port,
        out_dir,
        on_ready=lambda bound: out.print(
            f"capturing on {host}:{bound} into {out_dir}/ (Ctrl-C stops)"
        ),
        on_message=lambda m: out.print(f"{m.path.name}", markup=False),
    )


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
)
@click.option(
    "--serve",
    is_flag=True,
    help="Then keep the web app on http://127.0.0.1:8000 and the capture server running.",
)
def demo(out_dir: Path, serve: bool) -> None:
    """Run the whole path on embedded defaults: subscribers, articles, one digest delivered."""
    from mailer.devtools.demo import run_demo

    run_demo(out_dir, console=out, serve=serve)
