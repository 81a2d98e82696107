"""An ``ApiHost``'s cloudflared tunnel, kept across restarts: the server behind it changes, the
public URL stays. The server child runs with ``--tunnel none`` and reads this tunnel's state
from a file for its ``/health``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from llm_magic.files import write_atomically


class HostTunnel:
    """The tunnel a host opened, if any."""

    def __init__(self) -> None:
        self.tunnel: Any = None  # supervisor.tunnel.Tunnel, imported when first opened
        self._status_file: Path | None = None
        self._on_moved: Callable[[str, str], None] | None = None

    def open(self, port: int | None, token: str | None, status_file: Path,
             on_moved: Callable[[str, str], None]) -> tuple[str | None, str, bool]:
        """Open the tunnel to ``port``, or point the one kept from the last run at the new
        server. ``on_moved(url, state)`` hears of a new public URL (cloudflared restarted).
        Returns the public URL, what to say of the tunnel, and whether streams get through."""
        from llm_magic.supervisor.tunnel import Tunnel, open_tunnel, tunnel_note

        self._status_file, self._on_moved = status_file, on_moved
        tunnel = self.tunnel
        if tunnel is not None and tunnel.open and tunnel.port == port and tunnel.token == token:
            tunnel.on_change, tunnel.on_status = self._moved, self.write_status  # this run's now
            tunnel.check()  # the new server answers through the old tunnel
            note = tunnel_note(tunnel)
        else:
            self.stop()
            tunnel = self.tunnel = Tunnel(port, token=token, on_change=self._moved, on_status=self.write_status)
            _, note = open_tunnel(tunnel)
        self.write_status()
        return tunnel.public_url, note, tunnel.streams is not False

    def _moved(self, url: str) -> None:
        if self.tunnel is not None and self.tunnel.restarts and self._on_moved is not None:
            self.write_status()
            self._on_moved(url, self.tunnel.state)

    def write_status(self) -> None:
        """For the server's /health (the chat page reads whether the tunnel streams)."""
        tunnel, path = self.tunnel, self._status_file  # (the tunnel's thread calls this too)
        if tunnel is None or path is None:
            return
        try:
            write_atomically(path, json.dumps(tunnel.status()))
        except OSError:  # the run's folder went with a stop meanwhile
            pass

    def status(self) -> dict[str, Any]:
        return self.tunnel.status() if self.tunnel is not None else {}

    def stop(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()
            self.tunnel = None
