"""Watching a host from a real IPython shell, against the real HTTP server over the scripted
backend (no model): ``%llm status`` with the slots and pace of a remote host through its token,
``Client.slots()`` and ``metrics()``, and the live view redrawing in place and stopping cleanly
when the cell is interrupted."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from IPython.core.interactiveshell import InteractiveShell

from llm_magic.client.client import Client
from llm_magic.errors import AuthenticationError
from llm_magic.notebook.watch import TopView, sparkline
from llm_magic.server.app import create_app
from llm_magic.server.httpserver import HttpServer
from tests.fake_backend import Reply, ScriptedBackend

from .shell_fixtures import run

TOKEN = "watch-token"


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[ScriptedBackend, str]]:
    backend = ScriptedBackend([Reply("a b c d e f g h i j k l", piece_delay=0.05)])
    server = HttpServer(create_app(backend, token=TOKEN), "127.0.0.1", 0).start()
    try:
        yield backend, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_the_client_reads_slots_and_metrics_with_its_token(remote) -> None:
    _, url = remote
    slots = Client(url, TOKEN).slots()
    assert slots["slots_total"] == 4 and len(slots["slots"]) == 4
    assert "llm_magic_slots_total 4.0" in Client(url, TOKEN).metrics()
    with pytest.raises(AuthenticationError):
        Client(url, "wrong").slots()


def test_llm_status_shows_the_remote_hosts_slots(shell: InteractiveShell, magics, remote, capsys) -> None:
    _, url = remote
    magics.client = Client(url, TOKEN)
    streaming = threading.Thread(target=lambda: "".join(Client(url, TOKEN).chat_stream("hi")))
    streaming.start()
    try:
        out, err = run(shell, "%llm status", capsys)
    finally:
        streaming.join()
        magics.client = None
    assert not err and f"connected to {url}" in out
    assert "slots " in out and " of 4 busy" in out and "tokens/s" in out
    assert TOKEN not in out


def test_the_live_view_redraws_in_place_and_stops_when_interrupted(shell: InteractiveShell, remote, capsys) -> None:
    _, url = remote
    client = Client(url, TOKEN)
    calls = []

    def fetch() -> dict:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as interrupting the cell does, mid-refresh
        return client.slots()

    view = TopView(fetch, "host")
    view.run(None, 0.01)
    assert view.refreshes == 3 and len(view.history) == 3
    assert "stopped after 3 refreshes" in capsys.readouterr().out
    counted = TopView(client.slots, "host")
    counted.run(2, 0.01)
    assert counted.refreshes == 2 and counted.handle is not None


def test_sparkline() -> None:
    assert sparkline([0, 0]) == "▁▁" and sparkline([]) == ""
    assert sparkline([0, 5, 10]) == "▁▅█"
