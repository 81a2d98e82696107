"""Claude Code and Codex CLI themselves, from npm, against a real host on the embedded model
(scripts/agents_check): both answer, and Claude Code's second turn reads the first one's KV
cache. About 10 minutes on 2 CPU cores, most of it Claude Code's ~22k-token prompt, and the
Codex step ends only when the tiny model stops writing by itself: so it runs only when asked
(LLM_MAGIC_AGENT_TESTS=1), and is skipped where npm is missing or cannot reach its registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "agents_check"
NO_AGENTS = 2  # the script's exit status when it could not install the agents


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_claude_code_and_codex_answer_through_the_host() -> None:
    if os.environ.get("LLM_MAGIC_AGENT_TESTS") != "1":
        pytest.skip("about 10 minutes: set LLM_MAGIC_AGENT_TESTS=1 (or run scripts/agents_check)")
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm install the agents")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1700)
    if done.returncode == NO_AGENTS:
        pytest.skip("npm could not install the agents: " + done.stderr.strip()[-300:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "claude and codex answered through the host" in done.stdout
