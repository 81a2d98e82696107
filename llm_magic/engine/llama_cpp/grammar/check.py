"""A grammar is first compiled in a child process, and only then by the host itself.

llama.cpp's grammar parser recurses once per nested group, so a deep enough grammar overflows
the stack and takes the whole host down; and on a malformed grammar it prints the whole grammar
to stderr (an ``fprintf``, past any log callback), megabytes in an instant. The converter
(``json_grammar``) bounds and escapes what it writes, so neither should happen; this is the
guard for the day a bound is missed. The child compiles each new grammar on a 1 MiB stack (the
host's threads have 8), with its stderr captured: a crash or a time-out costs only the child
(started again for the next request), and the client gets a 400 with llama.cpp's first line.
Verdicts are cached, so a schema sent with every request is checked once.

Run as ``python -m llm_magic.engine.llama_cpp.grammar.check``: it reads grammars from stdin (a length line, then
the bytes) and answers each with one JSON line.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

from llm_magic.errors import InvalidRequest

log = logging.getLogger("llm_magic.engine")

CHECK_SECONDS = 10.0  # a bounded grammar compiles in milliseconds
CHILD_STACK = 1 << 20
VERDICTS = 1024  # grammars remembered as good (or bad, with their message)


class GrammarChecker:
    """Compiles grammars in a child process; ``check`` raises ``InvalidRequest`` for a grammar
    llama.cpp refuses or cannot survive."""

    def __init__(self, timeout: float = CHECK_SECONDS) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._verdicts: collections.OrderedDict[bytes, str | None] = collections.OrderedDict()

    def check(self, grammar: str) -> None:
        data = grammar.encode("utf-8")
        key = hashlib.sha256(data).digest()
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                error = self._verdicts[key]
            else:
                error = self._ask(data)
                if error is not None and error.startswith("!"):  # the child died or hung: not remembered
                    raise InvalidRequest(error[1:])
                self._verdicts[key] = error
                if len(self._verdicts) > VERDICTS:
                    self._verdicts.popitem(last=False)
        if error is not None:
            raise InvalidRequest(error)

    def _ask(self, data: bytes) -> str | None:
        child = self._child
        if child is None or child.poll() is not None:
            child = self._child = subprocess.Popen(
                [sys.executable, "-m", "llm_magic.engine.llama_cpp.grammar.check"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(b"%d\n" % len(data) + data)
            child.stdin.flush()
            line = _read_line(child.stdout, time.monotonic() + self.timeout)
        except OSError:
            line = None
        if line is None:  # it crashed (a stack overflow) or hung
            status = self._end_child()
            log.warning("a grammar took the grammar checker down (%s); it is refused", status)
            return ("!the structured-output grammar is too deeply nested or too large for llama.cpp to "
                    "compile; simplify the schema")
        reply = json.loads(line)
        if reply.get("ok"):
            return None
        return f"llama.cpp cannot compile the structured-output grammar: {reply.get('error') or 'refused'}"

    def _end_child(self) -> str:
        child, self._child = self._child, None
        if child is None:
            return "gone"
        if child.poll() is None:
            child.kill()
        try:
            code = child.wait(5)
        except subprocess.TimeoutExpired:
            return "did not end"
        return f"exit status {code}" if code >= 0 else f"signal {-code}"

    def close(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            if child.stdin is not None:
                child.stdin.close()  # it ends at end of input
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
            if child.stdout is not None:
                child.stdout.close()


def _read_line(stream, deadline: float) -> bytes | None:
    """One line from the child's stdout by ``deadline``; None at end of file or past it."""
    fd, buf = stream.fileno(), b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
    return buf


# -- the child ---------------------------------------------------------------------------------

def _compile(data: bytes) -> dict:
    """Compile ``data`` in a thread with a small stack, stderr captured; the verdict."""
    import llama_cpp

    result: dict = {"ok": False}

    def run() -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(None, data, b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
            result["ok"] = True

    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            threading.stack_size(CHILD_STACK)
            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read(4096).decode("utf-8", "replace")
    if not result["ok"]:
        result["error"] = _first_error(text)
    return result


def _first_error(text: str) -> str:
    """llama.cpp's own words, without the grammar it prints after them."""
    for line in text.splitlines():
        line = line.strip()
        if "error parsing grammar:" in line:
            return line.split("error parsing grammar:", 1)[1].strip()[:200]
        if "left recursion" in line:
            return "a rule refers to itself before any text (left recursion); a schema refers to itself that way"
        if line and "failed to parse grammar" not in line:
            return line[:200]
    return "refused"


def main() -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        data = stdin.read(int(line))
        stdout.write(json.dumps(_compile(data)).encode() + b"\n")
        stdout.flush()


if __name__ == "__main__":
    main()
