"""Shared pieces of the benchmarks: the sink, the databases, the config, measured processes.

Not a benchmark itself. Every bench script imports it (``from _lib import ...``: the scripts
run as ``.venv/bin/python bench/NAME.py`` from the repository root, so ``bench/`` is on the
path).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
MAILER = VENV / "bin" / "mailer"
WORK = Path(os.environ.get("MAILER_BENCH_DIR", "/tmp/mailer-bench"))
PG_URL = os.environ.get("MAILER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
SECRET = "bench-secret-0123456789abcdef0123456789"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
TOPICS = ("base-alerts", "local-events", "military-news")
# Every non-empty subset of the three topics: seven rendered variants of each issue.
VARIANTS: tuple[tuple[str, ...], ...] = tuple(
    tuple(t for i, t in enumerate(TOPICS) if mask >> i & 1) for mask in range(1, 8)
)
SENDER = "digest@news.example.org"


# ------------------------------------------------------------------ the Postfix test tools


def ensure_postfix() -> None:
    """Install Debian's postfix for smtp-sink/smtp-source if missing; never leave it running."""
    if not (Path(SMTP_SINK).exists() and Path(SMTP_SOURCE).exists()):
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print("installing postfix (for smtp-sink and smtp-source)...", file=sys.stderr)
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "postfix"], check=True, env=env)
    stop_postfix_daemon()


def stop_postfix_daemon() -> None:
    """The package may start the real MTA; the benchmarks need only the two test programs."""
    if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
        return
    status = subprocess.run(
        ["/usr/sbin/postfix", "status"], capture_output=True, text=True, check=False
    )
    if status.returncode == 0 and "is running" in (status.stdout + status.stderr):
        subprocess.run(["/usr/sbin/postfix", "stop"], capture_output=True, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def postgres_cpu_seconds() -> float:
    """utime + stime of every PostgreSQL server process, reaped children included (/proc):
    what the database spends on our statements, on this machine's one server."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, _, rest = stat.read_text().partition(") ")
        except OSError:
            continue
        if name.endswith("(postgres"):
            fields = rest.split()
            total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


class Sink:
    """Postfix's ``smtp-sink`` on 127.0.0.1: takes every message and throws it away.

    It counts messages itself (``-c``): ``received`` is the number of "." it has answered,
    read from its counter line, so a benchmark can check that everything arrived.
    """

    def __init__(self, *, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        cmd = [SMTP_SINK, "-c", *extra]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.received = 0
        self.stamps: list[tuple[float, int]] = []  # (monotonic time, messages so far)
        self.record = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise RuntimeError("smtp-sink did not start")

    def _read(self) -> None:
        # The counter line is rewritten in place: "sess=2 quit=2 mesg=50\r".
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(4096):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for line in done:
                if match := re.search(rb"mesg=(\d+)", line):
                    self.received = int(match.group(1))
                    if self.record:
                        self.stamps.append((time.monotonic(), self.received))

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ measured child processes


@dataclass
class Measured:
    """One child process: wall time, CPU seconds (user + system) and peak RSS, from wait4."""

    argv: list[str]
    returncode: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    max_rss_mb: float = 0.0
    stdout: str = ""
    stderr: str = ""
    # wait4's peak RSS: an upper bound, since it includes the benchmark's own peak RSS when
    # it started the child. ``max_rss_mb`` is the processes' own (HighWater).
    wait4_rss_mb: float = 0.0


class Child:
    """A subprocess whose resource usage is collected exactly with ``os.wait4``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stderr_file: Path | None = None,
    ) -> None:
        """``stderr_file``: the child's stderr goes there instead of into this process."""
        self.argv = [str(a) for a in argv]
        self.started = time.monotonic()
        err_file = None if stderr_file is None else stderr_file.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if err_file is None else err_file,
                env=env,
                cwd=ROOT,
            )
        finally:
            if err_file is not None:
                err_file.close()  # the child has its own copy
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._lines: list[str] = []
        self._line_event = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True)
        ]
        if self.proc.stderr is not None:
            self._threads.append(
                threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)
            )
        for t in self._threads:
            t.start()
        self._hwm = HighWater(self.proc.pid)

    def _pump(self, stream: Any, into: list[bytes]) -> None:
        for line in stream:
            into.append(line)
            if into is self._out:
                with self._line_event:
                    self._lines.append(line.decode(errors="replace"))
                    self._line_event.notify_all()
        with self._line_event:
            self._line_event.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> str | None:
        """The first stdout line matching ``pattern`` (None if the process ends first)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._line_event:
            while True:
                for line in self._lines:
                    if regex.search(line):
                        return line
                if not self._threads[0].is_alive():  # stdout closed: the process is ending
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._line_event.wait(min(left, 0.1))

    def wait(self) -> Measured:
        _, status, usage = os.wait4(self.proc.pid, 0)
        ended = time.monotonic()
        peak = self._hwm.stop()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        for t in self._threads:
            t.join()
        return Measured(
            argv=self.argv,
            returncode=self.proc.returncode,
            wall=ended - self.started,
            cpu=usage.ru_utime + usage.ru_stime,
            max_rss_mb=peak or usage.ru_maxrss / 1024,  # Linux: kilobytes
            wait4_rss_mb=usage.ru_maxrss / 1024,
            stdout=b"".join(self._out).decode(errors="replace"),
            stderr=b"".join(self._err).decode(errors="replace"),
        )


class HighWater:
    """The largest VmHWM of a process and its descendants, read from /proc every 20 ms.

    The kernel's peak RSS from wait4 (``ru_maxrss``) counts the image a process had before its
    exec: spawned with vfork or fork, that is this benchmark's, with its own peak so far (a
    template database filled here, a child's output held here). VmHWM is the peak of the
    process's own memory since its exec (a helper's since its fork). Read until the process
    ends: only a peak in its last 20 ms could be missed, and VmHWM never goes down.
    """

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._peaks: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        """The peak in MB over every process seen (0 if none could be read)."""
        self._done.set()
        self._thread.join()
        return max(self._peaks.values(), default=0.0)

    def _run(self) -> None:
        while not self._done.is_set():
            for pid in self._tree(self._pid):
                hwm = _vm_hwm_mb(pid)
                if hwm:
                    self._peaks[pid] = max(self._peaks.get(pid, 0.0), hwm)
            self._done.wait(0.02)

    def _tree(self, pid: int) -> list[int]:
        pids = [pid]
        for p in pids:  # grows as children are found
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        pids.extend(int(c) for c in f.read().split())
        return pids


def _vm_hwm_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_measured(
    argv: Sequence[str], *, env: dict[str, str] | None = None, stderr_file: Path | None = None
) -> Measured:
    return Child(argv, env=env, stderr_file=stderr_file).wait()


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, MAILER_SECRET_KEY=SECRET)
    env.pop("MAILER_CONFIG", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------ profiles


def py_spy(command: Sequence[str], raw: Path, *, mode: str, rate: int) -> None:
    """Run ``command`` under ``py-spy record`` (``mode``: ``--gil`` or ``--idle``), raw stacks
    into ``raw``; installs py-spy into the venv if it is missing."""
    spy = VENV / "bin" / "py-spy"
    if not spy.exists():
        subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    argv = [str(spy), "record", mode, "-r", str(rate), "-f", "raw", "-o", str(raw), "--"]
    subprocess.run([*argv, *command], env=bench_env(), check=True, capture_output=True)


def stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """The samples of a py-spy raw file: (function names, outermost first; count)."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        yield [f.split(" (", 1)[0] for f in stack.split(";")], int(count)


# ------------------------------------------------------------------ statistics


def median_range(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min–max)`` of several runs: the machine is shared, so one run proves little."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


# ------------------------------------------------------------------ config and content


def config_text(
    *,
    db_url: str,
    smtp_port: int,
    connections: int | None,
    rate_per_second: float = 0,
    batch_size: int = 500,
    dkim_key: Path | None = None,
) -> str:
    """A complete mailer config for the benchmarks (the example config's site and topics)."""
    site = {
        "name": "Camp Lejeune & New River Updates",
        "tagline": (
            "Essential base alerts, local events, and military news delivered to your inbox."
        ),
        "base_url": "https://news.example.org",
        "from": f"Camp Lejeune & New River Updates <{SENDER}>",
        "reply_to": "editor@news.example.org",
        "privacy_policy_url": "https://news.example.org/privacy",
        "privacy_policy_version": "2026-11-01",
        "postal_address": "Example Media, 100 Main Street, Jacksonville, NC 28540, USA",
        "publisher": "Example Media",
        "disclaimer": (
            "An independent local newsletter; not an official U.S. Marine Corps "
            "or Department of Defense publication."
        ),
        "timezone": "America/New_York",
        "secret_key_env": "MAILER_SECRET_KEY",
        "list_id": "updates.news.example.org",
        "unsubscribe_mailto": "unsubscribe@news.example.org",
        "feedback_id": "digest:updates:examplemedia",
    }
    smtp = {
        "host": "127.0.0.1",
        "port": smtp_port,
        "security": "none",
        # None: the key is left out, so the example config's default applies (and with it
        # `processes = "auto"`, which the benchmark's config never sets).
        **({} if connections is None else {"connections": connections}),
        "rate_per_second": rate_per_second,
        "timeout": 30,
        "batch_size": batch_size,
    }
    lines = ["[site]", *(f"{k} = {json.dumps(v)}" for k, v in site.items())]
    lines += ["", "[database]", f"url = {json.dumps(db_url)}"]
    lines += ["", "[smtp]", *(f"{k} = {json.dumps(v)}" for k, v in smtp.items())]
    if dkim_key is not None:
        lines += [
            "",
            "[dkim]",
            'domain = "news.example.org"',
            'selector = "bench"',
            f"private_key_file = {json.dumps(str(dkim_key))}",
        ]
    names = {"base-alerts": "Base alerts", "local-events": "Local events"}
    for key in TOPICS:
        lines += ["", "[[topics]]", f'key = "{key}"', f'name = "{names.get(key, "Military news")}"']
    lines += [
        "",
        "[[digests]]",
        'key = "weekly"',
        'name = "Weekly digest"',
        "subject = "
        + json.dumps(
            "Camp Lejeune & New River Updates \u2014 week of {{ date.strftime('%-d %B %Y') }}"
        ),
        'schedule = "0 7 * * fri"',
        'timezone = "America/New_York"',
        f"topics = {json.dumps(list(TOPICS))}",
        "max_articles = 20",
        # The example articles carry fixed dates: the issue must take them whenever it runs.
        "lookback_days = 3650",
    ]
    return "\n".join(lines) + "\n"


def write_config(path: Path, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(**kwargs), encoding="utf-8")
    return path


def load_bench_settings(path: Path) -> Any:
    from mailer.config.load import load_settings

    return load_settings(path, env={"MAILER_SECRET_KEY": SECRET})


def example_articles(now: datetime) -> list[Any]:
    """The package's example articles, parsed from the copies the demo makes (dated this week,
    so that no event in them is over; one is the site's own article)."""
    from mailer.content.files import load_article_file
    from mailer.devtools.demo import copy_examples

    with tempfile.TemporaryDirectory() as tmp:
        copy_examples(Path(tmp), now.date())
        return [
            load_article_file(p, default_topic="military-news", known_topics=TOPICS, now=now)
            for p in sorted((Path(tmp) / "articles").iterdir())
        ]


# The issue's articles: the examples hold six, a week of the site brings about three times
# as many. Each example appears WEEK_COPIES times (its own GUID, link and date), which makes the
# rendered digest 20–40 KB, the size of a real weekly issue, instead of 10–19 KB.
WEEK_COPIES = int(os.environ.get("MAILER_BENCH_COPIES", "3"))


def issue_articles(now: datetime) -> list[Any]:
    """The benchmark issue's articles: the examples, WEEK_COPIES times, newest first."""
    week = []
    for copy in range(WEEK_COPIES):
        for a in example_articles(now):
            if copy == 0:
                week.append(a)
                continue
            week.append(
                replace(
                    a,
                    guid=f"{a.guid}#{copy}",
                    link=f"{a.link}?part={copy}" if a.link else None,
                    title=f"{a.title} (part {copy + 1})",
                    published_at=a.published_at - timedelta(hours=copy),
                )
            )
    return week


def variant_of(i: int) -> tuple[str, ...]:
    """Subscriber i's topics: the seven topic sets in turn, so every variant is exercised."""
    return VARIANTS[i % len(VARIANTS)]


def issue_content(now: datetime) -> Any:
    """The benchmark issue as the composer takes it: ``issue_articles`` as stored articles."""
    from mailer.models import Article, IssueContent

    arts = tuple(
        Article(
            id=i,
            guid=p.guid,
            topic=p.topic,
            title=p.title,
            summary=p.summary,
            why_it_matters=p.why_it_matters,
            body=p.body,
            link=p.link,
            published_at=p.published_at,
        )
        for i, p in enumerate(issue_articles(now), 1)
    )
    return IssueContent(
        issue_id=1,
        digest_key="weekly",
        digest_name="Weekly digest",
        subject="Camp Lejeune & New River Updates \u2014 week of 27 November 2026",
        date=now,
        articles=arts,
    )


def sample_messages(settings: Any) -> dict[tuple[str, ...], bytes]:
    """One real digest message per topic variant, rendered from the example articles."""
    from mailer.compose.messages import DigestComposer
    from mailer.compose.rendering import Renderer
    from mailer.models import Recipient

    now = datetime.now(UTC)
    content = issue_content(now)
    composer = DigestComposer(settings, content, renderer=Renderer())
    recipient = Recipient(
        email="reader1@example.org",
        name="Reader 1",
        uid="AAAAAAAAAAAAAAAAAAAAAA",
        message_id="<weekly.202611271200.1.AAAAAAAAAAAAAAAAAAAAAA@news.example.org>",
    )
    out = {}
    for topics in VARIANTS:
        data = composer.message(recipient, topics, now)
        if data is not None:
            out[topics] = data
    return out


def mean_message_size(settings: Any) -> tuple[int, bytes]:
    """The mean size of a message over the variants (all equally common), and the variant's
    message whose size is closest to it (what smtp-source sends for the ceiling)."""
    messages = sample_messages(settings)
    mean = round(statistics.fmean(len(m) for m in messages.values()))
    closest = min(messages.values(), key=lambda m: abs(len(m) - mean))
    return mean, closest


# ------------------------------------------------------------------ databases


@dataclass
class Database:
    """A benchmark database made from a template (copied per run: every run starts equal)."""

    kind: str  # sqlite | postgres
    n: int
    url: str = ""
    templates: list[str] = field(default_factory=list)


def _pg_admin() -> Any:
    import psycopg

    url = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url, autocommit=True)


def _pg_url(name: str) -> str:
    base = PG_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def _fill(engine: Any, n: int) -> None:
    """Migrate, add the example articles and ``n`` active subscribers with topic variants.

    Bulk inserts through the driver (executemany / COPY): generating a million subscribers is
    set-up, not what is measured.
    """
    from mailer.content.store import upsert_articles
    from mailer.db.engine import migrate

    migrate(engine)
    now = datetime.now(UTC)
    upsert_articles(engine, issue_articles(now), now=now)
    rng = random.Random(5)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    stamp = now.isoformat(sep=" ")
    chunk = 50_000
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            subs = [
                (
                    i + 1,
                    "".join(rng.choices(alphabet, k=22)),
                    f"reader{i}@example.org",
                    f"Reader {i}",
                )
                for i in range(start, stop)
            ]
            topics = [(i + 1, t) for i in range(start, stop) for t in variant_of(i)]
            digests = [(i + 1, "weekly", stamp) for i in range(start, stop)]
            if engine.dialect.name == "sqlite":
                cur = dbapi.cursor()
                cur.execute("BEGIN")
                cur.executemany(
                    "INSERT INTO subscribers (id, uid, email, name, status, created_at,"
                    " updated_at, confirmed_at, consent_source, consent_at, bounce_count)"
                    f" VALUES (?, ?, ?, ?, 'active', '{stamp}', '{stamp}', '{stamp}',"
                    f" 'bench', '{stamp}', 0)",
                    subs,
                )
                cur.executemany(
                    "INSERT INTO subscriber_topics (subscriber_id, topic) VALUES (?, ?)", topics
                )
                cur.executemany(
                    "INSERT INTO subscriber_digests (subscriber_id, digest, chosen_at)"
                    " VALUES (?, ?, ?)",
                    digests,
                )
                cur.execute("COMMIT")
            else:
                with dbapi.cursor() as cur:
                    with cur.copy(
                        "COPY subscribers (id, uid, email, name, status, created_at, updated_at,"
                        " confirmed_at, consent_source, consent_at, bounce_count) FROM STDIN"
                    ) as copy:
                        for row in subs:
                            copy.write_row((*row, "active", now, now, now, "bench", now, 0))
                    with cur.copy(
                        "COPY subscriber_topics (subscriber_id, topic) FROM STDIN"
                    ) as copy:
                        for row in topics:
                            copy.write_row(row)
                    with cur.copy(
                        "COPY subscriber_digests (subscriber_id, digest, chosen_at) FROM STDIN"
                    ) as copy:
                        for i in range(start, stop):
                            copy.write_row((i + 1, "weekly", now))
                dbapi.commit()
        if engine.dialect.name == "postgresql":
            with dbapi.cursor() as cur:
                cur.execute(
                    "SELECT setval(pg_get_serial_sequence('subscribers', 'id'),"
                    " (SELECT max(id) FROM subscribers))"
                )
                cur.execute("ANALYZE")
            dbapi.commit()
        else:
            dbapi.execute("ANALYZE")
    finally:
        raw.close()


def schema_head() -> str:
    """The newest migration: templates are made per schema revision (others may add one)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(ROOT / "mailer" / "db" / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head() or "base"


def _built_on() -> str:
    """The day in a template's name: its articles are dated relative to it (``issue_articles``)."""
    return f"{datetime.now(UTC):%Y%m%d}"


def _sqlite_template(n: int) -> Path:
    path = WORK / f"template-sqlite-{n}-{schema_head()}-a{WEEK_COPIES}-{_built_on()}.db"
    if path.exists():
        return path
    from mailer.db.engine import create_engine

    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{tmp}")
    try:
        _fill(engine, n)
    finally:
        engine.dispose()  # the last connection to close checkpoints the WAL into the file
    tmp.rename(path)
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return path


def _pg_template(n: int) -> str:
    name = f"mailer_bench_tpl_{n}_{schema_head()}_a{WEEK_COPIES}_{_built_on()}"
    with _pg_admin() as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return name
        admin.execute(f'CREATE DATABASE "{name}"')
    from mailer.db.engine import create_engine

    engine = create_engine(_pg_url(name))
    try:
        _fill(engine, n)
    except BaseException:
        engine.dispose()
        drop_pg(name)
        raise
    engine.dispose()
    return name


def drop_pg(name: str) -> None:
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_database(kind: str, n: int, tag: str) -> str:
    """A database URL holding the articles and ``n`` subscribers, equal for every run."""
    WORK.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        template = _sqlite_template(n)
        path = WORK / f"run-{tag}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    template = _pg_template(n)
    name = f"mailer_bench_{tag}"
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return _pg_url(name)


def discard_database(url: str) -> None:
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm", "-writers"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        drop_pg(url.rsplit("/", 1)[1])


def drop_templates() -> None:
    """Remove every cached template (SQLite files and PostgreSQL databases)."""
    for path in WORK.glob("template-sqlite-*.db"):
        path.unlink()
    with contextlib.suppress(Exception), _pg_admin() as admin:
        names = [
            r[0]
            for r in admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'mailer\\_bench\\_tpl\\_%'"
            )
        ]
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def delivery_counts(url: str) -> dict[str, int]:
    from mailer.db.engine import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT status, count(*) FROM deliveries GROUP BY status"
            ).all()
    finally:
        engine.dispose()
    return {status: count for status, count in rows}


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_idle(seconds: float = 1.0) -> float:
    """The share of all CPUs' time that was idle over ``seconds`` (/proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


# The idle share wait_quiet waits for; MAILER_BENCH_IDLE overrides it (the figures print it).
QUIET_IDLE = float(os.environ.get("MAILER_BENCH_IDLE", "0.94"))


def wait_quiet(threshold: float = QUIET_IDLE, *, patience: float = 600.0) -> str:
    """Wait until the CPUs are at least ``threshold`` idle over two seconds (nobody else's work:
    this benchmark runs nothing between its runs), at most ``patience`` seconds; returns what
    was measured, to print with the run. The 1-minute load average is no use between runs:
    it still counts the run before."""
    deadline = time.monotonic() + patience
    while True:
        idle = cpu_idle(2.0)
        if idle >= threshold or time.monotonic() > deadline:
            return f"idle {idle:.0%} before, load {load_avg()}"
