"""``mailer dkim``: make a signing key and print its DNS record."""

from __future__ import annotations

import click

from mailer.cli.context import Context, out, pass_ctx
from mailer.errors import ConfigError


@click.group("dkim")
def group() -> None:
    """DKIM keys and DNS records."""


@group.command("keygen")
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace an existing key (signatures fail until DNS is updated)."
)
@pass_ctx
def dkim_keygen(ctx: Context, bits: int, force: bool) -> None:
    """Write [dkim].private_key_file (RSA, mode 0600) and print the DNS TXT record."""
    from mailer.compose.dkim import dns_record_name, generate_keypair, zone_file_line

    settings = ctx.settings.dkim
    if settings is None:
        raise ConfigError(
            "has no [dkim] table: set domain, selector and private_key_file, then run this again",
            path=str(ctx.config_path),
        )
    value = generate_keypair(settings.private_key_file, bits, overwrite=force)
    name = dns_record_name(settings)
    out.print(f"wrote {settings.private_key_file} ({bits}-bit RSA, mode 0600)", markup=False)
    out.print(f"publish this TXT record at {name}:", markup=False)
    out.print(value, markup=False)
    out.print("in a zone file:", markup=False)
    out.print(zone_file_line(name, value), markup=False)


@group.command("record")
@pass_ctx
def dkim_record(ctx: Context) -> None:
    """Print the DNS TXT record for the configured key (checks that the key is usable)."""
    from mailer.compose.dkim import DkimSigner, dns_record_name

    settings = ctx.settings.dkim
    if settings is None:
        raise ConfigError("has no [dkim] table", path=str(ctx.config_path))
    out.print(f"{dns_record_name(settings)} TXT", markup=False)
    out.print(DkimSigner.from_settings(settings).dns_record(), markup=False)
