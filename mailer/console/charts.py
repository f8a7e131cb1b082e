"""The console's charts as SVG, drawn by pygal from the figures (``mailer.console.figures``).

Each is a pure function of its figures and the site's zone, returning the SVG's bytes. The SVG
is shown with ``<img>`` (an image runs no script) and pulls nothing: no pygal script
(``js=[]``, and the script of its config taken out), no stylesheet of another origin (pygal's
CSS is written inside the SVG), and the comments naming pygal's web site are taken out.
It has a viewBox and no fixed size, so it takes the width of its box, down to a phone's; its
fonts are large enough for that (a 390 px screen shows the 480-unit-wide chart at about two
thirds of its size), and its axes carry few labels.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pygal
from pygal.style import Style

from mailer.console.figures import (
    COMPLAINT_LIMIT,
    HARD_BOUNCE_LIMIT,
    OUTCOMES,
    DayRates,
    IssueOutcomes,
    Week,
)

# pygal appends an old-style import hook for its map plugins (pygal.maps.*, never used here)
# to sys.meta_path; Python warns (ImportWarning) whenever an import falls through to it.
sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, pygal.PluginImportFixer)]

NAVY = "#17324d"
GOLD = "#f2c14e"
ACCENT = "#1f5fa8"
DANGER = "#9b1c1c"
MUTED = "#52606d"
GREY = "#9aa5b1"
SANS = "Arial, Helvetica, sans-serif"
WIDTH = 480
HEIGHT = 360
# Per outcome, in OUTCOMES order: sent is the bulk, the trouble stands out.
OUTCOME_COLOURS = (NAVY, GOLD, DANGER, "#5c0f0f", GREY, ACCENT)
OUTCOME_LABELS = {
    "sent": "Sent",
    "deferred": "Deferred",
    "bounced": "Bounced",
    "failed": "Failed",
    "cancelled": "Cancelled",
    "other": "Queued or unknown",
}
LIMIT_DASH = "14 7"
LEGEND_ROW = 36  # pygal's height of a legend row at legend_font_size 19


def _self_contained(root: Any) -> Any:
    """pygal's tree without what it writes for a browser to fetch or run: the script that
    hands its config to pygal's (absent) tooltip script, written even with ``js=[]``, and the
    comments naming pygal's web site."""
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag
            # A comment's tag is the Comment factory, not a name.
            if callable(tag) or str(tag).rpartition("}")[2] == "script":
                parent.remove(child)
    return root


def count_text(value: float) -> str:
    """A count as the charts and their tables write it (thousands separated)."""
    return f"{value:,.0f}"


def nice_top(value: float) -> float:
    """The round number an axis ends at, a little above ``value``: its steps stay whole."""
    step = 1.0
    while True:
        for factor in (1, 2, 2.5, 4, 5):
            if factor * step >= max(value * 1.05, 4):
                return factor * step
        step *= 10


def percent_text(value: float) -> str:
    """A rate in percent as the rate charts and their tables write it."""
    return f"{value:.2f} %"


def style(colours: Sequence[str]) -> Style:
    """The site's palette and sans-serif type, sized to be read at half size."""
    return Style(
        background="#ffffff",
        plot_background="#ffffff",
        foreground=NAVY,
        foreground_strong=NAVY,
        foreground_subtle="#c9d2dc",
        opacity="1",
        opacity_hover="1",
        colors=tuple(colours),
        font_family=SANS,
        label_font_size=19,
        major_label_font_size=19,
        legend_font_size=19,
        title_font_size=22,
        value_font_size=19,
        tooltip_font_size=19,
        no_data_font_size=22,
    )


def _config(colours: Sequence[str], no_data: str, **options: Any) -> dict[str, Any]:
    return {
        "style": style(colours),
        "js": [],
        "width": WIDTH,
        "height": HEIGHT,
        "legend_at_bottom": True,
        "legend_at_bottom_columns": 1,
        "legend_box_size": 16,
        "truncate_legend": -1,
        "truncate_label": -1,
        "x_label_rotation": 0,
        "show_minor_x_labels": False,
        "min_scale": 3,
        "max_scale": 5,
        "value_formatter": count_text,
        "dots_size": 3.5,
        "margin_right": 28,  # the last x label is centred on the plot's right edge
        "no_data_text": no_data,
        **options,
    }


def _lines(*widths: tuple[float, str]) -> list[str]:
    """pygal's stylesheets and the width (and dashes) of each series' line, in order.

    pygal's own ``stroke_style`` loses to the 1-unit width its stylesheet gives every line,
    so the widths are a rule of ours (pygal's rules name the chart's random id; ours can only
    outweigh them as important)."""
    rules = "".join(
        f".serie-{i} .line{{stroke-width:{width}px !important;stroke-opacity:1 !important;"
        + (f"stroke-dasharray:{dashes} !important;" if dashes else "")
        + "}"
        for i, (width, dashes) in enumerate(widths)
    )
    return ["file://style.css", "file://graph.css", "inline:" + rules]


def _empty(no_data: str) -> bytes:
    """A chart with nothing to draw: its message, and no axes or frame around nothing."""
    chart = pygal.Line(
        **_config(
            (NAVY,),
            no_data,
            show_legend=False,
            show_x_labels=False,
            show_y_labels=False,
            show_x_guides=False,
            show_y_guides=False,
            height=160,
        )
    )
    return _svg(chart)


def _svg(chart: Any) -> bytes:
    chart.add_xml_filter(_self_contained)
    svg: bytes = chart.render()
    return svg


def _day(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%-d %b")


def _major(labels: Sequence[str], every: int) -> list[str]:
    """Every ``every``-th label from the last one: the rest stay off a narrow axis."""
    last = len(labels) - 1
    return [label for i, label in enumerate(labels) if (last - i) % every == 0]


def subscribers_chart(weeks: Sequence[Week], zone: ZoneInfo) -> bytes:
    """Active subscribers at each week's end (a line on the left axis), with the week's
    sign-ups and unsubscribes (lines on the right axis)."""
    if not any(w.active or w.signups or w.unsubscribes for w in weeks):
        return _empty("No confirmed subscribers yet")
    labels = [_day(w.end, zone) for w in weeks]
    chart = pygal.Line(
        **_config(
            (NAVY, ACCENT, DANGER),
            "",
            x_labels_major=_major(labels, 3),
            range=(0, nice_top(max(w.active for w in weeks))),
            secondary_range=(0, nice_top(max(max(w.signups, w.unsubscribes) for w in weeks))),
            # pygal reserves the height of the right axis' legends twice under the chart:
            # give the second back (two rows of the legend).
            margin_bottom=-2 * LEGEND_ROW,
            css=_lines((5, ""), (3, ""), (3, "8 5")),
        )
    )
    chart.x_labels = labels
    chart.add("Active at the week's end", [w.active for w in weeks])
    chart.add("Sign-ups in the week (right axis)", [w.signups for w in weeks], secondary=True)
    chart.add(
        "Unsubscribes in the week (right axis)",
        [w.unsubscribes for w in weeks],
        secondary=True,
    )
    return _svg(chart)


def deliveries_chart(found: Sequence[IssueOutcomes], zone: ZoneInfo) -> bytes:
    """Each issue's deliveries, stacked by outcome."""
    if not any(issue.total for issue in found):
        return _empty("No issue has gone out yet")
    top = nice_top(max(issue.total for issue in found))
    chart = pygal.StackedBar(
        **_config(OUTCOME_COLOURS, "", legend_at_bottom_columns=2, range=(0, top))
    )
    labels = [f"#{issue.issue_id}" for issue in found]
    chart.x_labels = labels
    chart.x_labels_major = _major(labels, 2 if len(labels) > 6 else 1)
    for outcome in OUTCOMES:
        chart.add(
            OUTCOME_LABELS[outcome],
            [
                {
                    "value": issue.counts[outcome] or None,
                    "label": f"issue {issue.issue_id}, {_day(issue.scheduled_for, zone)}",
                }
                for issue in found
            ],
        )
    return _svg(chart)


def rate_chart(days: Sequence[DayRates], zone: ZoneInfo, *, complaints: bool) -> bytes:
    """The 30-day complaint rate (``complaints``) or hard-bounce rate, day by day, in percent,
    with the limit as a dashed line named in the legend. A day with no message sent in its 30
    days has no rate (a gap)."""
    limit = COMPLAINT_LIMIT if complaints else HARD_BOUNCE_LIMIT
    values = [
        None
        if not day.rates.attempted
        else 100 * (day.rates.complaint_rate if complaints else day.rates.hard_bounce_rate)
        for day in days
    ]
    if all(value is None for value in values):
        return _empty("No mail sent in the last 30 days")
    # Room above the limit line, never past 100 %.
    top = min(
        nice_top(max([100 * limit * 1.5, *(v for v in values if v is not None)]) * 100) / 100, 100
    )
    labels = [_day(day.at, zone) for day in days]
    what = "Complaint rate" if complaints else "Hard-bounce rate"
    chart = pygal.Line(
        **_config(
            (ACCENT if complaints else NAVY, DANGER),
            "",
            range=(0, top),
            x_labels_major=_major(labels, 7),
            value_formatter=percent_text,
            css=_lines((4, ""), (4, LIMIT_DASH)),
        )
    )
    chart.x_labels = labels
    chart.add(f"{what}, 30 days (%)", values)
    chart.add(
        f"Limit {100 * limit:g} % (Gmail, Yahoo)",
        [100 * limit] * len(days),
        show_dots=False,
    )
    return _svg(chart)
