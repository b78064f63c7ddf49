"""The `gpuphase top` loop: a scraper thread, a keyboard thread, one queue, one frame per event.

On a terminal the frame is a rich Live screen (the alternate screen, like top) redrawn on every
reading and key press; `q` quits, `s` cycles the GPU sort order. When stdout is not a terminal,
frames are printed as plain text one after another; `--once` prints one frame and exits (1 when
the agent cannot be scraped).
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.live import Live

from gpuphase.top.fetch import ScrapeError, Target, scrape
from gpuphase.top.model import History, ParseError, Reading, parse
from gpuphase.top.render import Options, frame_text, render
from gpuphase.top.view import SORT_ORDER, next_sort, summarize

WINDOW = 60.0  # the phase shares' and rates' window
ONCE_EXTRA_READINGS = 2  # --once: more readings when phase time did not advance between the first two

Scraper = Callable[[], str]


def read(scraper: Scraper, clock: Callable[[], float] = time.monotonic) -> Reading:
    """One scrape, parsed; ScrapeError for either failure."""
    text = scraper()
    try:
        return parse(text, clock())
    except ParseError as err:
        raise ScrapeError(str(err)) from None


def _width(out: TextIO) -> int:
    if out.isatty():
        return shutil.get_terminal_size((160, 50)).columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 40 else 160


def once(scraper: Scraper, options: Options, interval: float, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr, sleep: Callable[[float], None] = time.sleep) -> int:
    """Two readings `interval` apart (more, up to ONCE_EXTRA_READINGS, while the agent's phase time
    has not advanced between them), one frame. 1 when the agent cannot be scraped."""
    history = History(WINDOW)
    try:
        history.add(read(scraper))
        for _ in range(1 + ONCE_EXTRA_READINGS):
            sleep(interval)
            history.add(read(scraper))
            readings = history.readings
            if len(readings) < 2 or not readings[-1].seconds or readings[-1].seconds != readings[-2].seconds:
                break  # phase time advanced (or there is none to wait for, or the agent restarted)
    except ScrapeError as error:
        print(f"gpuphase top: {error}", file=err)
        return 1
    options = _replace(options, keys=False)
    if out.isatty() and not options.plain:
        console = Console(file=out)
        console.print(render(summarize(history), _replace(options, width=console.size.width)))
    else:
        out.write(frame_text(summarize(history), _replace(options, plain=True, width=_width(out))))
    out.flush()
    return 0


def _replace(options: Options, **changes: object) -> Options:
    return replace(options, **changes)  # type: ignore[arg-type]


class _Scraper(threading.Thread):
    """Scrapes every `interval` seconds and posts ("reading", Reading) or ("error", message)."""

    def __init__(self, scraper: Scraper, interval: float, events: "queue.Queue[tuple[str, object]]"):
        super().__init__(name="top-scraper", daemon=True)
        self.scraper, self.interval, self.events = scraper, interval, events
        self.stopping = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self.stopping.is_set():
            try:
                self.events.put(("reading", read(self.scraper)))
            except ScrapeError as error:
                self.events.put(("error", str(error)))
            except Exception as error:  # a bug must show on screen, not kill the view silently
                self.events.put(("error", f"{type(error).__name__}: {error}"))
            due += self.interval
            now = time.monotonic()
            if due < now:
                due = now + self.interval  # fell behind (a slow scrape): do not burst
            self.stopping.wait(due - now)


@contextmanager
def _keys(events: "queue.Queue[tuple[str, object]]") -> Iterator[bool]:
    """Key presses as ("key", char) events while stdin is a terminal in cbreak mode (no echo, no
    line buffering; Ctrl-C still interrupts). Yields whether keys are read; restores the terminal."""
    try:
        fd = sys.stdin.fileno()
        interactive = os.isatty(fd)
    except (OSError, ValueError, AttributeError):
        interactive = False
    if not interactive:
        yield False
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    stopping = threading.Event()

    def reader() -> None:
        while not stopping.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(fd, 64)
            except (OSError, ValueError):
                return
            if not data:
                return
            for char in data.decode(errors="ignore"):
                events.put(("key", char))

    tty.setcbreak(fd)
    thread = threading.Thread(target=reader, name="top-keys", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stopping.set()
        thread.join(1.0)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def live(scraper: Scraper, options: Options, interval: float, out: TextIO = sys.stdout) -> int:
    """Until q (or Ctrl-C, SIGTERM): redraw on each reading and key. Plain frames when out is not a terminal."""
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    history = History(WINDOW)
    tty_out = out.isatty()
    plain = options.plain or not tty_out
    options = _replace(options, plain=plain, error=f"connecting to {options.url} ...")
    previous = signal.signal(signal.SIGTERM, _terminate)
    worker = _Scraper(scraper, interval, events)
    worker.start()
    try:
        with _keys(events) as keys:
            options = _replace(options, keys=keys)
            if tty_out:
                console = Console(file=out, no_color=plain)
                with Live(render(None, options), console=console, screen=True, auto_refresh=False,
                          redirect_stdout=False, redirect_stderr=False) as screen:
                    for options in _frames(events, history, options, interval):
                        screen.update(render(summarize(history), _replace(options, width=console.size.width)),
                                      refresh=True)
            else:
                for options in _frames(events, history, options, interval):
                    out.write(frame_text(summarize(history), _replace(options, width=_width(out))) + "\n")
                    out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `gpuphase top | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - let the interpreter's final flush succeed
        except OSError:
            pass
    finally:
        worker.stopping.set()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _frames(events: "queue.Queue[tuple[str, object]]", history: History, options: Options,
            interval: float) -> Iterator[Options]:
    """The options of each frame to draw, as events arrive; returns on q."""
    while True:
        kind, value = events.get()
        if kind == "key":
            if value in ("q", "Q"):
                return
            if value in ("s", "S"):
                options = _replace(options, sort=next_sort(options.sort))
            else:
                continue
        elif kind == "reading":
            assert isinstance(value, Reading)
            history.add(value)
            options = _replace(options, error=None, stale_for=None)
        else:
            newest = history.newest
            stale = time.monotonic() - newest.time if newest else None
            options = _replace(options, error=f"{value}; retrying every {interval:g}s",
                               stale_for=stale)
        yield options


def run_top(target: Target, *, interval: float = 1.0, run_once: bool = False, sort: str = "gpu",
            plain: bool = False, max_processes: int = 10) -> int:
    if sort not in SORT_ORDER:
        raise ValueError(f"unknown sort {sort!r}; known: {', '.join(SORT_ORDER)}")
    options = Options(url=target.shown, sort=sort, plain=plain, max_processes=max_processes)

    def scraper() -> str:
        return scrape(target)

    if run_once:
        return once(scraper, options, interval)
    return live(scraper, options, interval)
