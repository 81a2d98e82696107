"""The host's server log: bounded on disk, and read from its end.

The server child's stdout and stderr go into a pipe, not a file: llama.cpp's C code writes to
fd 2 directly, past any Python logging handler, and once wrote 1 GB in a few seconds. The pipe's
other end is read by a small writer process of its own (``python -m llm_magic.supervisor.logfile PATH``):

- it survives the server's crash (a thread in the server would die with it, and with it the
  last lines, which say why); it outlives the notebook kernel for as long as the server does
  (a server writing into a pipe nobody reads fails as it shuts down); and it never makes the
  server wait on the kernel (a thread in the kernel would, whenever the kernel's own work holds
  the GIL);
- it keeps the file under ``max_bytes`` and rotates it (``server.log.1`` … ``.{backups}``), so
  the log never holds more than ``(backups + 1) * max_bytes``;
- a flood (more than ``burst`` bytes at once, then more than ``rate`` bytes/s) is left out of the
  file, and each second of it is summarised in one line followed by its last lines, so the lines
  before the flood (start-up, the request that caused it) stay in the log.

Reading (``ServerLog.tail``) first has the writer sync (all that the pipe held is then in the
file, so a line the server wrote is there to read), then seeks from the end and reads a bounded
number of bytes, never the whole file.
Standard library only (the supervisor tier).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

MAX_BYTES = 4 * 1024 * 1024  # per file
BACKUPS = 2  # rotated files kept: at most 12 MiB of log in all
BURST = 1024 * 1024  # bytes written as they come before a flood is summarised
RATE = 256 * 1024  # bytes/s the log may grow by, on average, beyond the burst
FLOOD_TAIL = 8 * 1024  # of what a flood left out, its end is kept (that is where errors are)
SUMMARY_EVERY = 1.0  # s: a long flood is summarised once a second
QUIET = 0.2  # s without output: a flood is over, and summarised at once
READ_SIZE = 64 * 1024
LINE_CHARS = 2000  # of one line shown by tail(): a longer one is cut, with its length
PIPE_SIZE = 1024 * 1024  # Linux's default limit for an unprivileged pipe: slack for a busy writer


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    if n < 1024**2:
        return f"{n / 1024:.1f} KB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MB"
    return f"{n / 1024**3:.1f} GB"


class BoundedLog:
    """Appends to ``path`` within ``max_bytes`` per file (rotating), summarising floods."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS, burst: int = BURST,
                 rate: float = RATE) -> None:
        self.path, self.max_bytes, self.backups = path, max(max_bytes, 4096), max(backups, 0)
        self.burst, self.rate = burst, rate
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._tokens, self._refilled = float(burst), time.monotonic()
        self._dropped = 0  # bytes of the current flood left out
        self._flood_started = self._last_data = 0.0
        self._flood_tail = bytearray()

    def write(self, data: bytes, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_data = now
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._dropped:
            self._leave_out(data)
        elif len(data) <= self._tokens:
            self._tokens -= len(data)
            self._append(data)
        else:  # a flood starts: write what the budget allows, up to a line's end
            cut = data.rfind(b"\n", 0, int(self._tokens)) + 1
            self._tokens -= cut
            self._append(data[:cut])
            self._flood_started = now
            self._leave_out(data[cut:])
        if self._dropped and now - self._flood_started >= SUMMARY_EVERY:
            self._summarise(now)

    def tick(self, now: float | None = None) -> None:
        """Summarise a flood that has gone quiet (called a few times a second)."""
        now = time.monotonic() if now is None else now
        if self._dropped and now - self._last_data >= QUIET:
            self._summarise(now)

    def flush(self) -> None:
        """Summarise the flood going on, if one is: someone reads the log now."""
        if self._dropped:
            self._summarise(time.monotonic())

    def close(self) -> None:
        self.flush()
        os.close(self._fd)

    def _leave_out(self, data: bytes) -> None:
        self._dropped += len(data)
        self._flood_tail += data
        del self._flood_tail[:-FLOOD_TAIL]

    def _summarise(self, now: float) -> None:
        tail = bytes(self._flood_tail)
        if self._dropped > len(tail) and b"\n" in tail:
            tail = tail[tail.index(b"\n") + 1:]  # whole lines only
        left_out = self._dropped - len(tail)
        note = (f"[llm_magic: {_size(left_out)} of the server's output left out here: it wrote more than "
                f"{_size(self.rate)}/s for {now - self._flood_started:.1f} s; its last lines follow]\n").encode()
        self._append((note if left_out else b"") + tail + (b"" if tail.endswith(b"\n") or not tail else b"\n"))
        self._dropped, self._flood_tail = 0, bytearray()
        self._flood_started = now

    def _append(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self._size
            if len(data) > room and self._size > 0:
                # fill this file up to a line's end if one fits, then start the next file
                cut = data.rfind(b"\n", 0, room) + 1
                if cut:
                    self._write_all(data[:cut])
                    data = data[cut:]
                self._rotate()
                continue
            part, data = data[:self.max_bytes], data[self.max_bytes:]
            self._write_all(part)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self._size += written

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                older = rotated(self.path, i)
                if older.exists():
                    os.replace(older, rotated(self.path, i + 1))
            os.replace(self.path, rotated(self.path, 1))
        else:
            self.path.unlink(missing_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        self._size = 0


def rotated(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def pump(source: int, log: BoundedLog, control: int | None = None, ack: int | None = None) -> None:
    """Copy everything from the file descriptor ``source`` into ``log`` until end of file.

    ``control``: where the host asks to sync (a line with a number), answered on ``ack`` with
    that line once everything that was in the pipe when asked is in the file."""
    if os.name != "posix":  # no select() on pipes: copy, summarising a flood when it ends
        while data := os.read(source, READ_SIZE):
            log.write(data)
        log.close()
        return
    os.set_blocking(source, False)
    watched = [source] + ([control] if control is not None else [])
    try:
        while True:
            ready, _, _ = select.select(watched, [], [], QUIET / 2)
            if source in ready and not _drain(source, log):
                break
            if control is not None and control in ready:
                asked = os.read(control, 4096)
                if not asked:  # the host closed it: no more syncs
                    watched.remove(control)
                    control = None
                    continue
                open_ = _drain(source, log)
                log.flush()
                if ack is not None:
                    _answer(ack, asked.splitlines()[-1] + b"\n")
                if not open_:
                    break
            log.tick()
    finally:
        log.close()


def _drain(source: int, log: BoundedLog, most: int = 64) -> bool:
    """Copy what the pipe holds now (``most`` reads at a time, so that a flood leaves room for
    syncs and summaries); False at end of file."""
    for _ in range(most):
        try:
            data = os.read(source, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        log.write(data)
    return True


def _answer(ack: int, line: bytes) -> None:
    try:
        os.write(ack, line)
    except OSError:  # the host is gone: nobody is waiting
        pass


def tail(path: Path, n: int, *, backups: int = BACKUPS, limit: int | None = None) -> str:
    """The last ``n`` lines of the log at ``path`` and, where it has fewer, of its rotated files:
    read backwards from the end, ``limit`` bytes at most (by default about 1 KB a line)."""
    if n <= 0:
        return ""
    budget = limit if limit is not None else min(256 * 1024 + n * 1024, 8 * 1024 * 1024)
    blocks: list[bytes] = []  # newest first
    newlines = 0
    complete = True  # whether the oldest file was read from its very start
    for file in [path, *(rotated(path, i) for i in range(1, backups + 1))]:
        try:
            with file.open("rb") as f:
                position = f.seek(0, os.SEEK_END)
                while position > 0 and newlines <= n and budget > 0:
                    step = min(READ_SIZE, position, budget)
                    position -= step
                    f.seek(position)
                    block = f.read(step)
                    blocks.append(block)
                    newlines += block.count(b"\n")
                    budget -= len(block)
                complete = position == 0
        except FileNotFoundError:
            continue
        if newlines > n or budget <= 0:
            break
    data = b"".join(reversed(blocks))
    if not complete and b"\n" in data:
        data = data[data.index(b"\n") + 1:]  # the first line is cut: leave it out
    lines = data.decode("utf-8", errors="replace").splitlines()[-n:]
    return "\n".join(line if len(line) <= LINE_CHARS else f"{line[:LINE_CHARS]}… ({len(line)} characters)"
                     for line in lines)


class ServerLog:
    """The log of one server run: the child's output goes to ``pipe()``, read by a writer
    process that keeps ``path`` within its cap; ``tail(n)`` reads its end, once the writer has
    written all that the pipe held when asked."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._writer: subprocess.Popen | None = None
        self._out: int | None = None  # the pipe's write end, until the child has it
        self._control: int | None = None  # where this process asks the writer to sync
        self._asked = 0
        self._answers = b""
        self._lock = threading.Lock()

    def pipe(self) -> int:
        """Start the writer; return the pipe's write end, for the child's stdout and stderr.
        Call ``release()`` once the child has it."""
        command = [sys.executable, "-m", "llm_magic.supervisor.logfile", str(self.path),
                   "--max-bytes", str(self.max_bytes), "--backups", str(self.backups)]
        source, self._out = os.pipe()
        _widen(self._out)
        passed: tuple[int, ...] = ()
        if os.name == "posix":
            control, self._control = os.pipe()
            command += ["--control", str(control)]
            passed = (control,)
        try:
            self._writer = subprocess.Popen(command, stdin=source, stdout=subprocess.PIPE, pass_fds=passed)
        finally:
            os.close(source)
            for fd in passed:
                os.close(fd)
        return self._out

    def release(self) -> None:
        """Close this process's copy of the write end: the writer ends when the child's does."""
        if self._out is not None:
            os.close(self._out)
            self._out = None

    def sync(self, timeout: float = 2.0) -> None:
        """Wait (``timeout`` s at most) until what the pipe holds now is in the file."""
        with self._lock:
            writer, control = self._writer, self._control
            if writer is None or control is None or writer.stdout is None or writer.poll() is not None:
                return
            self._asked += 1
            token = b"%d\n" % self._asked
            try:
                os.write(control, token)
            except OSError:  # the writer has ended
                return
            deadline = time.monotonic() + timeout
            while b"\n" + token not in b"\n" + self._answers:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([writer.stdout], [], [], max(left, 0))
                if not ready:
                    return  # a writer that lags this much: the file as it is
                data = os.read(writer.stdout.fileno(), 4096)
                if not data:
                    return
                self._answers = (self._answers + data)[-4096:]
            self._answers = b""

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until the writer has written everything (the child and its own children have
        exited); end it after ``timeout`` s. True if it had finished by itself."""
        with self._lock:
            writer, self._writer = self._writer, None
            self.release()
            if self._control is not None:
                os.close(self._control)
                self._control = None
        if writer is None:
            return True
        try:
            writer.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait(5)
            return False
        finally:
            if writer.stdout is not None:
                writer.stdout.close()

    def tail(self, n: int) -> str:
        self.sync()
        return tail(self.path, n, backups=self.backups)

    def files(self) -> list[Path]:
        return [p for p in [self.path, *(rotated(self.path, i) for i in range(1, self.backups + 1))] if p.exists()]


def _widen(fd: int) -> None:
    """A larger pipe buffer, so that a writer that lags (a loaded machine) rarely holds the server
    up. Linux only; elsewhere the default is kept."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux
    if set_size is None:
        return
    try:
        fcntl.fcntl(fd, set_size, PIPE_SIZE)
    except OSError:  # over /proc/sys/fs/pipe-max-size: the default buffer does
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_magic.supervisor.logfile",
                                     description="Copy standard input into a bounded, rotated log file.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    parser.add_argument("--backups", type=int, default=BACKUPS)
    parser.add_argument("--burst", type=int, default=BURST)
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--control", type=int, default=None, help="a file descriptor where the host asks to sync")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: keep writing until the server is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = BoundedLog(args.path, max_bytes=args.max_bytes, backups=args.backups, burst=args.burst, rate=args.rate)
    pump(sys.stdin.fileno(), log, args.control, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
