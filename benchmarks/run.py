"""llm_magic benchmarks, side by side in one run.

    python benchmarks/run.py [--rounds 10] [--out benchmarks/results]

Measures, on the embedded SmolLM2-135M model with greedy sampling, interleaving the variants
round by round so that machine drift hits each alike:

- generation tokens/s, one stream: llama-cpp-python in-process (``Llama.create_completion``
  at its best thread count), our ``/api``, our ``/v1/completions`` streaming, llama.cpp's own
  C++ ``llama-server`` (built from the llama.cpp inside the installed llama-cpp-python: see
  ``llama_server.py``) answering whole and streaming, and llama-cpp-python's ``llama_cpp.server``;
- per-request overhead (``max_tokens=1``) and time to the first streamed token;
- a long chat (~1,500 tokens of history): next turn's time to first token, KV cache warm vs cold;
- prompt reading: a ~2,000-token prompt no cache holds, time to its first token on llm_magic and
  llama-server (4 slots each), alone and with three streams being written beside it;
- 1, 4 and 16 concurrent streaming clients against llm_magic ``--parallel 1`` and ``4``,
  llama-server ``-np 1`` and ``-np 4``, and ``llama_cpp.server``: aggregate tokens/s, p50/p95
  time to first token and latency, errors; then 4 and 16 clients again, llm_magic ``--parallel 4``
  and llama-server ``-np 4`` taking turns for several rounds, and the median of their ratios;
- speculation: decode tokens/s of a code edit (a 40-line cell written again with one name
  changed) and of prose, llm_magic with ``--spec ngram`` and with ``speculative: false``, and
  llama-server with no speculation, ``--spec-type ngram-simple`` and ``ngram-mod``;
- a decode step of 1 to 32 tokens of one answer, in-process: what verifying a draft costs, and
  so the most speculation can gain on this machine;
- chat decode tokens/s plain, with JSON-schema structured output, and with logprobs; ``n=4``
  against one answer;
- ``llm-magic serve`` start-up time to a healthy ``/health``.

Prints a table, writes ``latest.json`` and ``concurrency.png`` into ``--out``. Every comparison
is a ratio of figures measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import requests

from llm_magic import ApiHost
from llm_magic.engine.llama_cpp.backend import best_thread_count
from llm_magic.models import embedded_model_path

PROMPT = "Once upon a time, in a small village by the sea, there lived an old clockmaker who"
# ggml's worker threads spin for about 10 ms after in-process work; each timed measurement
# waits this long first, so that every variant starts from an idle machine.
SETTLE_SECONDS = 0.03
GEN_TOKENS = 128


def new_session() -> requests.Session:
    """A keep-alive session that retries once when a server has closed an idle connection
    (llama-server closes them after 5 s): such a request never reached the server."""
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    s = requests.Session()
    s.mount("http://", HTTPAdapter(max_retries=Retry(total=1, connect=1, read=1, status=0, allowed_methods=None)))
    return s


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, path: str = "/health", timeout: float = 120) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if requests.get(url + path, timeout=2).ok:
                return time.perf_counter() - started
        except requests.RequestException:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} did not become healthy")


class LlamaCppServer:
    """llama-cpp-python's own OpenAI-compatible server, same model and threads."""

    def __init__(self, model: Path, threads: int) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
             "--n_threads_batch", str(threads)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url, "/v1/models")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class LlamaServer:
    """llama.cpp's own C++ server, same model, threads and context; ``parallel`` slots."""

    def __init__(self, binary: Path, model: Path, threads: int, parallel: int, extra: list[str] | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--ctx-size", str(4096 * parallel), "--parallel", str(parallel), "--threads", str(threads),
             "--threads-batch", str(threads), "--no-webui", *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- one measurement of each kind ---------------------------------------------------------------


def inprocess_completion(llm, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - started, out["usage"]["completion_tokens"]


def inprocess_ttft(llm) -> float:
    started = time.perf_counter()
    stream = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0, stream=True)
    next(iter(stream))
    elapsed = time.perf_counter() - started
    for _ in stream:
        pass
    return elapsed


def api_completion(session: requests.Session, url: str, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    r = session.post(url + "/api", json={"inputs": PROMPT, "parameters": {"max_tokens": max_tokens, "temperature": 0}},
                     timeout=300)
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed, r.json()["usage"]["completion_tokens"]


def v1_completion(session: requests.Session, url: str, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    r = session.post(url + "/v1/completions", timeout=300,
                     json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed, r.json()["usage"]["completion_tokens"]


def v1_stream(session: requests.Session, url: str, body: dict, path: str = "/v1/completions",
              whole: bool = False) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed request; ``whole``:
    a stream that carries an error or ends before its finish_reason raises, as a failed request."""
    started = time.perf_counter()
    first = None
    tokens = 0
    finished = False
    with session.post(url + path, json={**body, "stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines(chunk_size=None):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if whole and "error" in chunk:
                raise requests.RequestException(f"the stream failed: {chunk['error']}")
            choice = (chunk.get("choices") or [{}])[0]
            finished = finished or bool(choice.get("finish_reason"))
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                tokens += 1  # one chunk per token from both servers
                if first is None:
                    first = time.perf_counter() - started
    if whole and not finished:
        raise requests.RequestException("the stream ended before its finish_reason")
    return first or 0.0, time.perf_counter() - started, tokens


# -- the benchmark sections ------------------------------------------------------------------------


def rotated(variants: dict, i: int) -> list:
    """The variants in an order that shifts every round, so that drift and any after-effect of
    one variant on the next fall on every variant alike."""
    items = list(variants.items())
    shift = i % len(items)
    return items[shift:] + items[:shift]


def throughput(llm, ours: str, theirs: str, cpp: str, rounds: int) -> tuple[dict, float]:
    s_ours, s_theirs, s_cpp = new_session(), new_session(), new_session()
    variants = {
        "in-process": lambda: inprocess_completion(llm, GEN_TOKENS),
        "/api": lambda: api_completion(s_ours, ours, GEN_TOKENS),
        "/v1 stream": lambda: v1_stream(s_ours, ours, {"prompt": PROMPT, "max_tokens": GEN_TOKENS, "temperature": 0})[1:],
        "llama-server": lambda: v1_completion(s_cpp, cpp, GEN_TOKENS),
        # the same stream from llama-server: the client's own reading of SSE costs both alike
        "llama-server stream": lambda: v1_stream(s_cpp, cpp, {"prompt": PROMPT, "max_tokens": GEN_TOKENS,
                                                               "temperature": 0})[1:],
        "llama_cpp.server": lambda: v1_completion(s_theirs, theirs, GEN_TOKENS),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name, run in rotated(variants, i):
            time.sleep(SETTLE_SECONDS)
            elapsed, tokens = run()
            rates[name].append(tokens / elapsed)
    # this VM's speed drifts by more than the gaps measured: the ratio within each round, whose
    # variants ran seconds apart, and its median, follow the drift less than a ratio of medians
    return ({name: statistics.median(values) for name, values in rates.items()},
            paired(rates["/v1 stream"], rates["llama-server stream"]))


def paired(ours: list[float], theirs: list[float]) -> float:
    """The median of the round-by-round ratios of two series measured in the same rounds."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


STORY_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
                "required": ["title", "story"]}


def features(ours: str, rounds: int) -> dict:
    """Decode tokens/s (the host's own timings, prompt excluded) of a chat answer plain, with
    JSON-schema structured output, and with logprobs (top 5): what each feature costs."""
    session = new_session()
    base = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
            "max_tokens": GEN_TOKENS, "temperature": 0}
    variants = {
        "plain": base,
        "json_schema": {**base, "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "story", "schema": STORY_SCHEMA}}},
        "logprobs (top 5)": {**base, "logprobs": True, "top_logprobs": 5},
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name, body in rotated(variants, i):
            time.sleep(SETTLE_SECONDS)
            r = session.post(ours + "/v1/chat/completions", json=body, timeout=300)
            r.raise_for_status()
            rates[name].append(r.json()["timings"]["predicted_per_second"])
    return {name: statistics.median(values) for name, values in rates.items()}


CODE_CELL = """import csv
from dataclasses import dataclass


@dataclass
class Reading:
    station: str
    value: float


def load(path):
    readings = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            readings.append(Reading(row["station"], float(row["value"])))
    return readings


def summarize(readings):
    \"\"\"Return the count, total and mean of the values, per station.\"\"\"
    stations = {}
    for reading in readings:
        entry = stations.setdefault(reading.station, {"count": 0, "total": 0.0})
        entry["count"] += 1
        entry["total"] += reading.value
    for entry in stations.values():
        entry["mean"] = entry["total"] / entry["count"]
    return stations


def report(stations):
    lines = []
    for name in sorted(stations):
        entry = stations[name]
        lines.append(f"{name}: {entry['count']} readings, mean {entry['mean']:.2f}")
    return "\\n".join(lines)


if __name__ == "__main__":
    print(report(summarize(load("readings.csv"))))
"""
CODE_EDIT = {"messages": [{"role": "user", "content": "Here is a Python cell:\n\n```python\n" + CODE_CELL + "```\n\n"
                           "Rewrite the cell with the function summarize renamed to describe. Reply with the whole "
                           "cell in a code block."}], "max_tokens": 400, "temperature": 0}
PROSE_CHAT = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a bottle."}],
              "max_tokens": 300, "temperature": 0}


def speculation(servers: dict[str, tuple[str, dict]], rounds: int) -> dict:
    """Decode tokens/s (each server's own timings) of a code edit (a 44-line cell to write again
    with one name changed) and of prose, on each server with and without speculation, and the
    share of drafted tokens accepted."""
    session = new_session()
    rates = {(work, name): [] for work in ("code edit", "prose") for name in servers}
    accepted: dict[tuple[str, str], list[float]] = {key: [] for key in rates}
    plain_answers: dict[str, str] = {}
    for i in range(rounds):
        for name, (url, extra) in rotated(servers, i):
            for work, body in (("code edit", CODE_EDIT), ("prose", PROSE_CHAT)):
                time.sleep(SETTLE_SECONDS)
                r = session.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=600)
                r.raise_for_status()
                timings = r.json()["timings"]
                if name == "llm_magic, speculative: false":
                    plain_answers[work] = r.json()["choices"][0]["message"]["content"]
                rates[work, name].append(timings["predicted_per_second"])
                if timings.get("draft_n"):
                    accepted[work, name].append(timings.get("draft_n_accepted", 0) / timings["draft_n"])
    return {work: {name: {"tokens_per_s": statistics.median(rates[work, name]),
                          "accepted": statistics.median(accepted[work, name]) if accepted[work, name] else None}
                   for name in servers} for work in ("code edit", "prose")} | {"plain_answers": plain_answers}


def speculation_ceiling(model: Path, answers: dict[str, str], step_ms: dict[int, float]) -> dict[str, float]:
    """The most n-gram speculation could gain on each workload's plain greedy answer with these
    step costs: if every step drafted exactly the tokens about to be taken (llm_magic's n-gram
    guesses, up to 16, from the prompt's text without the chat template), no more, so that no
    drafted token is wasted. A ceiling no sizing of the drafts can pass on that answer; one
    written with drafts may differ from it where llama.cpp's kernels do (README)."""
    import llama_cpp

    from llm_magic.engine.llama_cpp.speculation import NgramDrafter, SpecSettings

    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    prompts = {"code edit": CODE_EDIT, "prose": PROSE_CHAT}
    ceilings = {}
    try:
        for work, answer in answers.items():
            history = vocab.tokenize(prompts[work]["messages"][0]["content"].encode())
            tokens, taken, spent = vocab.tokenize(answer.encode(), add_bos=False, special=False), 0, 0.0
            drafter = NgramDrafter(SpecSettings(draft_max=16, draft_min=1))
            while taken < len(tokens):
                guess, run = drafter.draft(history, tokens[taken]), 0
                while run < len(guess) and taken + 1 + run < len(tokens) and guess[run] == tokens[taken + 1 + run]:
                    run += 1
                spent += interpolated(step_ms, 1 + run)
                history += tokens[taken:taken + 1 + run]
                taken += 1 + run
            ceilings[work] = len(tokens) * step_ms[1] / spent if spent else 1.0
    finally:
        vocab.close()
    return ceilings


def interpolated(step_ms: dict[int, float], k: int) -> float:
    """A step of ``k`` tokens' milliseconds, linear between the measured sizes."""
    below = max(size for size in step_ms if size <= k)
    above = min((size for size in step_ms if size >= k), default=below)
    if above == below:
        return step_ms[below]
    return step_ms[below] + (step_ms[above] - step_ms[below]) * (k - below) / (above - below)


def report_speculation(table: dict) -> str:
    lines = [f"{'decode tokens/s, speculation':<34}{'code edit':>10}{'accepted':>10}{'prose':>10}{'accepted':>10}"]
    for name in table["code edit"]:
        row = f"  {name:<32}"
        for work in ("code edit", "prose"):
            cell = table[work][name]
            row += f"{cell['tokens_per_s']:>10.1f}" + (f"{cell['accepted']:>10.2f}" if cell["accepted"] is not None else f"{'-':>10}")
        lines.append(row)
    if "ceiling" in table:
        ceiling = table["ceiling"]
        lines.append(f"  {'ceiling (x no speculation)':<32}{ceiling['code edit']:>10.2f}{'':>10}{ceiling['prose']:>10.2f}")
    return "\n".join(lines)


def only_speculation(rounds: int) -> int:
    from llama_server import build

    binary, model, threads = build(), embedded_model_path(), best_thread_count()
    peers = {"llama-server": LlamaServer(binary, model, threads, 1),
             "llama-server ngram-simple": LlamaServer(binary, model, threads, 1, ["--spec-type", "ngram-simple"]),
             "llama-server ngram-mod": LlamaServer(binary, model, threads, 1, ["--spec-type", "ngram-mod"])}
    host = ApiHost(use_token=False, port=0, tunnel="none").start()
    try:
        table = speculation(speculation_servers(host.url or "", peers), rounds)
    finally:
        host.stop()
        for peer in peers.values():
            peer.stop()
    steps = step_costs(model, threads, rounds)
    table["ceiling"] = speculation_ceiling(model, table.pop("plain_answers"), steps)
    print(report_speculation(table), report_step_costs(steps), sep="\n\n")
    return 0


STEP_TOKENS = (1, 2, 4, 8, 16, 32)


def step_costs(model: Path, threads: int, rounds: int) -> dict[int, float]:
    """Milliseconds llama.cpp takes to decode a step of k tokens of one answer, each with its
    logits (what verifying k-1 drafted tokens costs), after 200 tokens of context. ``k × ms(1)
    / ms(k)`` is the most any speculation can gain here: the speed-up if every drafted token
    were taken."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, logits_all=True,
                          flash_attn=True, verbose=False)
    try:
        tokens = llm.tokenize(CODE_CELL.encode() * 3)[:200 + max(STEP_TOKENS)]
        llm.eval(tokens[:200])
        times: dict[int, list[float]] = {k: [] for k in STEP_TOKENS}
        for _ in range(2 + 4 * rounds):  # the first two of each are warm-up
            for k in STEP_TOKENS:
                llm.n_tokens = 200
                llm._ctx.kv_cache_seq_rm(-1, 200, -1)
                time.sleep(SETTLE_SECONDS)
                started = time.perf_counter()
                llm.eval(tokens[200:200 + k])
                times[k].append(time.perf_counter() - started)
        return {k: 1000 * statistics.median(ts[2:]) for k, ts in times.items()}
    finally:
        llm.close()


def report_step_costs(ms: dict[int, float]) -> str:
    lines = [f"{'a decode step of k tokens':<34}{'ms':>10}{'ms a token':>12}{'ceiling':>10}"]
    for k, t in ms.items():
        lines.append(f"  {'k = ' + str(k):<32}{t:>10.1f}{t / k:>12.1f}{k * ms[1] / t:>10.2f}")
    return "\n".join(lines)


def speculation_servers(ours: str, peers: dict) -> dict[str, tuple[str, dict]]:
    return {"llm_magic --spec ngram": (ours, {}), "llm_magic, speculative: false": (ours, {"speculative": False}),
            **{name: (peer.url, {}) for name, peer in peers.items()}}


# The costliest schema a host accepts for per-token checks: the most enum values, each long,
# sharing their start (so the grammar keeps them all alive for many tokens).
WORST_SCHEMA = {"enum": [f"the answer that this host may give, number {i:03d}" for i in range(256)]}


def neighbours(ours: str, rounds: int) -> dict:
    """A tiny request's time (4 tokens) alone, beside plain answers being written, and beside
    answers under the costliest accepted grammar: what one client's constraint costs the others."""
    session = new_session()
    tiny = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    plain = {"messages": [{"role": "user", "content": "Pick one of the listed answers."}], "max_tokens": 48,
             "temperature": 0}
    worst = {**plain, "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WORST_SCHEMA}}}

    def beside(body: dict | None) -> float:
        done = threading.Event()

        def load() -> None:
            other = new_session()
            while not done.is_set():
                other.post(ours + "/v1/chat/completions", json=body, timeout=300).raise_for_status()

        thread = threading.Thread(target=load) if body is not None else None
        if thread is not None:
            thread.start()
            time.sleep(0.5)
        started = time.perf_counter()
        session.post(ours + "/v1/chat/completions", json=tiny, timeout=300).raise_for_status()
        elapsed = time.perf_counter() - started
        done.set()
        if thread is not None:
            thread.join()
        return elapsed * 1000

    times: dict[str, list[float]] = {"alone": [], "beside plain": [], "beside the costliest grammar": []}
    bodies = {"alone": None, "beside plain": plain, "beside the costliest grammar": worst}
    for i in range(rounds):
        for name, _ in rotated(times, i):
            time.sleep(SETTLE_SECONDS)
            times[name].append(beside(bodies[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def n_choices(ours: str, rounds: int, n: int = 4) -> dict:
    """Wall time of one request for ``n`` answers against one for a single answer (sampled, so
    that the answers differ; each is ``GEN_TOKENS`` long unless the model ends it)."""
    session = new_session()
    body = {"prompt": PROMPT, "max_tokens": GEN_TOKENS, "temperature": 0.8}
    times: dict[int, list[float]] = {1: [], n: []}
    tokens: dict[int, list[int]] = {1: [], n: []}
    for i in range(rounds):
        for k in ((1, n) if i % 2 else (n, 1)):
            time.sleep(SETTLE_SECONDS)
            started = time.perf_counter()
            r = session.post(ours + "/v1/completions", json={**body, "n": k, "seed": i}, timeout=300)
            times[k].append(time.perf_counter() - started)
            r.raise_for_status()
            tokens[k].append(r.json()["usage"]["completion_tokens"])
    return {"n": n, "one_s": statistics.median(times[1]), "n_s": statistics.median(times[n]),
            "one_tokens": statistics.median(tokens[1]), "n_tokens": statistics.median(tokens[n])}


def overhead(llm, ours: str, theirs: str, cpp: str, n: int) -> dict:
    s_ours, s_theirs, s_cpp = new_session(), new_session(), new_session()
    variants = {
        "in-process": lambda: inprocess_completion(llm, 1)[0],
        "/api": lambda: api_completion(s_ours, ours, 1)[0],
        "/v1": lambda: v1_completion(s_ours, ours, 1)[0],
        "llama-server": lambda: v1_completion(s_cpp, cpp, 1)[0],
        "llama_cpp.server": lambda: v1_completion(s_theirs, theirs, 1)[0],
    }
    stream_body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    ttft_variants = {  # name: (the 1-token request that sets the state, the timed stream)
        "in-process": (variants["in-process"], lambda: inprocess_ttft(llm)),
        "/v1 stream": (variants["/v1"], lambda: v1_stream(s_ours, ours, stream_body)[0]),
        "llama-server stream": (variants["llama-server"], lambda: v1_stream(s_cpp, cpp, stream_body)[0]),
        "llama_cpp.server stream": (variants["llama_cpp.server"], lambda: v1_stream(s_theirs, theirs, stream_body)[0]),
    }
    one_token = {name: [] for name in variants}
    ttft = {name: [] for name in ttft_variants}
    # Each timed call follows an identical one, so every variant starts from the same state (the
    # prompt exactly in the KV cache, nothing to evaluate): what is left is per-request overhead.
    for i in range(n):
        for name, run in rotated(variants, i):
            run()
            time.sleep(SETTLE_SECONDS)
            one_token[name].append(run() * 1000)
        for name, (prime, run) in rotated(ttft_variants, i):
            prime()
            time.sleep(SETTLE_SECONDS)
            ttft[name].append(run() * 1000)
    return {"one_token_ms": {k: statistics.median(v) for k, v in one_token.items()},
            "ttft_ms": {k: statistics.median(v) for k, v in ttft.items()}}


def long_chat(ours: str, rounds: int) -> dict:
    session = new_session()
    facts = [f"Fact {i}: the lighthouse keeper's {i}th notebook describes a ship with {i % 7 + 2} masts, "
             f"painted {['red', 'blue', 'green', 'white'][i % 4]}, that arrived on a {['calm', 'stormy'][i % 2]} night."
             for i in range(40)]
    history = [{"role": "system", "content": "You are a careful archivist."}]
    for i in range(0, 40, 4):
        history.append({"role": "user", "content": " ".join(facts[i:i + 4])})
        history.append({"role": "assistant", "content": f"Noted facts {i} to {i + 3}."})
    history.append({"role": "user", "content": "How many masts did the ship in fact 12 have?"})
    body = {"messages": history, "max_tokens": 16, "temperature": 0}
    warm, cold, prompt_tokens = [], [], 0
    for i in range(rounds):
        # warm: the previous request was this same conversation, so its prefix is in the KV cache
        v1_stream(session, ours, body, "/v1/chat/completions")
        history_turn = {**body, "messages": history + [{"role": "assistant", "content": "Four."},
                                                         {"role": "user", "content": "And fact 13?"}]}
        warm.append(v1_stream(session, ours, history_turn, "/v1/chat/completions")[0] * 1000)
        # cold: the same turn of a conversation no slot has seen (its system prompt differs)
        unseen = [{"role": "system", "content": f"You are a careful archivist, number {i}."}, *history_turn["messages"][1:]]
        cold.append(v1_stream(session, ours, {**history_turn, "messages": unseen}, "/v1/chat/completions")[0] * 1000)
        info = session.post(ours + "/v1/chat/completions", json={**history_turn, "max_tokens": 1}, timeout=300).json()
        prompt_tokens = info["usage"]["prompt_tokens"]
    return {"prompt_tokens": prompt_tokens, "warm_ttft_ms": statistics.median(warm),
            "cold_ttft_ms": statistics.median(cold)}


def long_prompt(round_: int, words: int = 1150) -> str:
    """A prompt of about 2,000 tokens that no cache holds (it starts with the round's number)."""
    body = " ".join(f"In year {1800 + i % 200} the {['north', 'south', 'east', 'west'][i % 4]} tower's clock was "
                    f"{['repaired', 'wound', 'painted', 'moved'][i % 3]} by keeper number {i}." for i in range(words // 12))
    return f"Record {round_}. {body}\nSummary of the records:"


def prompt_reading(servers: dict[str, str], rounds: int) -> dict:
    """Time to the first token of a ~2,000-token prompt no cache holds, on each server alone
    and with three streams being written beside it (each server its own three, at once)."""
    prompt_tokens = 0
    times: dict[str, list[float]] = {f"{name}{beside}": [] for name in servers for beside in ("", " + 3 streams")}
    for i in range(rounds):
        for name, url in rotated(servers, i):
            session = new_session()
            prompt = {"prompt": long_prompt(i * 10 + len(name)), "max_tokens": 1, "temperature": 0}
            time.sleep(SETTLE_SECONDS)
            times[name].append(v1_stream(session, url, prompt)[0] * 1000)
            stop = threading.Event()
            writing = threading.Barrier(4)

            def stream(c: int, url: str = url) -> None:  # writes until told to stop
                lines, session = 0, new_session()
                while not stop.is_set():
                    body = {"prompt": f"{PROMPT} (story {c}.{lines})", "max_tokens": 2000, "temperature": 0,
                            "stream": True}
                    with session.post(url + "/v1/completions", json=body, stream=True, timeout=300) as r:
                        for _ in r.iter_lines(chunk_size=None):
                            lines += 1
                            if lines == 4:
                                writing.wait(60)
                            if stop.is_set():
                                return

            with ThreadPoolExecutor(3) as pool:
                streams = [pool.submit(stream, c) for c in range(3)]
                writing.wait(60)
                try:
                    prompt = {**prompt, "prompt": long_prompt(i * 10 + len(name) + 5)}
                    times[f"{name} + 3 streams"].append(v1_stream(session, url, prompt)[0] * 1000)
                finally:
                    stop.set()
                for future in streams:
                    future.result()
            time.sleep(2)  # the server notices its streams' clients left, and is idle for the next
        if not prompt_tokens:
            info = new_session().post(next(iter(servers.values())) + "/v1/completions",
                                      json={"prompt": long_prompt(-1), "max_tokens": 1}, timeout=300).json()
            prompt_tokens = info["usage"]["prompt_tokens"]
    pairs = {}
    if {"llm_magic", "llama-server"} <= set(servers):
        pairs = {beside.strip() or "alone": paired(times[f"llm_magic{beside}"], times[f"llama-server{beside}"])
                 for beside in ("", " + 3 streams")}
    return {"prompt_tokens": prompt_tokens, "ttft_ms": {name: statistics.median(v) for name, v in times.items()},
            "paired_vs_llama_server": pairs}


def concurrency(url: str, clients: int, per_client: int = 3, max_tokens: int = 64) -> dict:
    """``clients`` streaming clients at once, each asking ``per_client`` times in turn."""
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    tokens = 0

    def client(c: int) -> None:
        nonlocal errors, tokens
        session = new_session()
        for i in range(per_client):
            body = {"prompt": f"{PROMPT} (story {c}.{i})", "max_tokens": max_tokens, "temperature": 0}
            try:
                first, total, n = v1_stream(session, url, body, whole=True)
            except (requests.RequestException, ValueError):  # ValueError: a chunk that is not JSON
                errors += 1
                continue
            ttfts.append(first * 1000)
            latencies.append(total * 1000)
            tokens += n

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, c) for c in range(clients)]:
            future.result()
    wall = time.perf_counter() - started

    def pct(values: list[float], q: float) -> float:
        values = sorted(values) or [0.0]
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"clients": clients, "requests": clients * per_client, "errors": errors, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p95_ms": pct(ttfts, 0.95),
            "p50_ms": pct(latencies, 0.5), "p95_ms": pct(latencies, 0.95)}


def startup_seconds(runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        port = free_port()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "llm_magic", "serve", "--no-token", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    if requests.get(url + "/health", timeout=2).json().get("status") == "ok":
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.02)
            times.append(time.perf_counter() - started)
        finally:
            proc.terminate()
            proc.wait(10)
    return statistics.median(times)


# -- report --------------------------------------------------------------------------------------------


def machine() -> dict:
    import llama_cpp

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": best_thread_count(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "date": time.strftime("%Y-%m-%d")}


def plot(table: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for server, rows in table.items():
        clients = [r["clients"] for r in rows]
        left.plot(clients, [r["tokens_per_s"] for r in rows], "o-", label=server)
        right.plot(clients, [r["p50_ms"] for r in rows], "o-", label=server)
    left.set(title="Aggregate throughput", xlabel="concurrent clients", ylabel="tokens/s", xscale="log", ylim=(0, None))
    right.set(title="p50 latency, 64 tokens", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
    for ax in (left, right):
        ax.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CLIENTS = (1, 4, 16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per comparison")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", choices=["neighbours", "features", "prompt", "clients", "speculation", "steps"],
                        help="one measurement, printed, nothing saved: of llm_magic alone (neighbours, "
                             "features), prompt reading beside llama-server -np 4 (prompt), 4 and 16 clients "
                             "beside llama-server -np 4, round by round (clients), speculation beside "
                             "llama-server's with its ceiling (speculation), or decode steps in-process (steps)")
    args = parser.parse_args()
    if args.only == "prompt":
        return only_prompt_reading(max(3, args.rounds))
    if args.only == "clients":
        return only_clients(max(3, args.rounds))
    if args.only == "speculation":
        return only_speculation(max(2, args.rounds // 2))
    if args.only == "steps":
        print(report_step_costs(step_costs(embedded_model_path(), best_thread_count(), args.rounds)))
        return 0
    if args.only:
        host = ApiHost(use_token=False, port=0, tunnel="none").start()
        try:
            if args.only == "neighbours":
                print(report_neighbours(neighbours(host.url or "", max(3, args.rounds // 2))))
            else:
                feats = features(host.url or "", max(3, args.rounds // 2))
                print("\n".join(f"{name:<34}{rate:>8.1f} tokens/s {rate / feats['plain']:>7.3f}"
                                for name, rate in feats.items()))
        finally:
            host.stop()
        return 0

    import llama_cpp

    from llama_server import build

    binary = build()  # first, so that its minutes of compiling are not measured beside anything
    model = embedded_model_path()
    threads = best_thread_count()
    llm = llama_cpp.Llama(str(model), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False,
                          flash_attn=True)  # llama-server's default, and ours
    hosts = {"llm_magic --parallel 4": ApiHost(use_token=False, port=0, tunnel="none").start(),
             "llm_magic --parallel 1": ApiHost(use_token=False, port=0, tunnel="none",
                                               extra_args=["--parallel", "1"]).start()}
    peers = {"llama-server -np 4": LlamaServer(binary, model, threads, 4),
             "llama-server -np 1": LlamaServer(binary, model, threads, 1),
             "llama_cpp.server": LlamaCppServer(model, threads)}
    speculating = {"llama-server ngram-simple": LlamaServer(binary, model, threads, 1, ["--spec-type", "ngram-simple"]),
                   "llama-server ngram-mod": LlamaServer(binary, model, threads, 1, ["--spec-type", "ngram-mod"])}
    urls = {**{name: h.url or "" for name, h in hosts.items()}, **{name: p.url for name, p in peers.items()}}
    ours, theirs, cpp = urls["llm_magic --parallel 4"], urls["llama_cpp.server"], urls["llama-server -np 1"]
    try:
        for warmup in (lambda: inprocess_completion(llm, 8), *[
                lambda url=url: v1_completion(new_session(), url, 8) for url in urls.values()]):
            warmup()
        rates, stream_paired = throughput(llm, ours, theirs, cpp, args.rounds)
        results = {
            "machine": machine(),
            "model": model.name,
            "threads": threads,
            "throughput_tokens_per_s": rates,
            "v1_stream_vs_llama_server_stream_paired": stream_paired,
            **overhead(llm, ours, theirs, cpp, n=20 * args.rounds),
            "long_chat": long_chat(ours, max(2, args.rounds // 2)),
            "prompt_reading": prompt_reading({"llm_magic": ours, "llama-server": urls["llama-server -np 4"]},
                                             max(3, args.rounds)),
            "features_tokens_per_s": features(ours, max(3, args.rounds // 2)),
            "n_choices": n_choices(ours, max(3, args.rounds // 2)),
            "neighbours_ms": neighbours(ours, max(3, args.rounds // 2)),
            "concurrency": {name: [concurrency(url, n) for n in CLIENTS] for name, url in urls.items()},
            "clients_paired": clients_paired({"llm_magic": ours, "llama-server": urls["llama-server -np 4"]},
                                             max(3, args.rounds)),
            "speculation": speculation(speculation_servers(ours, {"llama-server": peers["llama-server -np 1"],
                                                                  **speculating}), max(2, args.rounds // 2)),
        }
    finally:
        for server in [*peers.values(), *speculating.values(), *hosts.values()]:
            server.stop()
        llm.close()
    results["step_ms"] = step_costs(model, threads, args.rounds)
    results["speculation"]["ceiling"] = speculation_ceiling(model, results["speculation"].pop("plain_answers"),
                                                            results["step_ms"])
    results["startup_s"] = startup_seconds()

    t = results["throughput_tokens_per_s"]
    o, f = results["one_token_ms"], results["ttft_ms"]
    chat, nc, table = results["long_chat"], results["n_choices"], results["concurrency"]
    pr = results["prompt_reading"]["ttft_ms"]
    results["ratios"] = {
        "api_vs_inprocess": t["/api"] / t["in-process"],
        "v1_stream_vs_inprocess": t["/v1 stream"] / t["in-process"],
        "v1_stream_vs_llama_server": t["/v1 stream"] / t["llama-server"],
        "v1_stream_vs_llama_server_stream": t["/v1 stream"] / t["llama-server stream"],
        "v1_stream_vs_llama_server_stream_paired": results["v1_stream_vs_llama_server_stream_paired"],
        "prompt_ttft_vs_llama_server_paired": results["prompt_reading"]["paired_vs_llama_server"]["alone"],
        "prompt_ttft_beside_3_streams_vs_llama_server_paired":
            results["prompt_reading"]["paired_vs_llama_server"]["+ 3 streams"],
        "llama_cpp_server_vs_inprocess": t["llama_cpp.server"] / t["in-process"],
        "api_overhead_ms": o["/api"] - o["in-process"],
        "v1_overhead_ms": o["/v1"] - o["in-process"],
        "llama_cpp_server_overhead_ms": o["llama_cpp.server"] - o["in-process"],
        "ttft_ms_over_llama_cpp_server": f["/v1 stream"] - f["llama_cpp.server stream"],
        "kv_cache_speedup": chat["cold_ttft_ms"] / chat["warm_ttft_ms"],
        "prompt_ttft_vs_llama_server": pr["llm_magic"] / pr["llama-server"],
        "prompt_ttft_beside_3_streams_vs_llama_server": pr["llm_magic + 3 streams"] / pr["llama-server + 3 streams"],
        "json_schema_vs_plain": results["features_tokens_per_s"]["json_schema"] / results["features_tokens_per_s"]["plain"],
        "logprobs_vs_plain": results["features_tokens_per_s"]["logprobs (top 5)"] / results["features_tokens_per_s"]["plain"],
        "n4_time_vs_one": nc["n_s"] / nc["one_s"],
        "tiny_beside_costliest_grammar_vs_beside_plain": results["neighbours_ms"]["beside the costliest grammar"]
        / results["neighbours_ms"]["beside plain"],
        "clients4_vs_llama_server_np4": table["llm_magic --parallel 4"][1]["tokens_per_s"]
        / table["llama-server -np 4"][1]["tokens_per_s"],
        "code_edit_spec_vs_none": results["speculation"]["code edit"]["llm_magic --spec ngram"]["tokens_per_s"]
        / results["speculation"]["code edit"]["llm_magic, speculative: false"]["tokens_per_s"],
        "spec_ceiling_at_16": 16 * results["step_ms"][1] / results["step_ms"][16],
        "code_edit_spec_ceiling": results["speculation"]["ceiling"]["code edit"],
        "prose_spec_vs_none": results["speculation"]["prose"]["llm_magic --spec ngram"]["tokens_per_s"]
        / results["speculation"]["prose"]["llm_magic, speculative: false"]["tokens_per_s"],
        "clients16_vs_llama_server_np4": table["llm_magic --parallel 4"][2]["tokens_per_s"]
        / table["llama-server -np 4"][2]["tokens_per_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    try:
        plot(table, args.out / "concurrency.png")
    except ImportError:
        print("(no plot: pip install 'llm_magic[bench]' for matplotlib)")
    return 0


def beside_llama_server(measure: Callable[[dict[str, str]], str]) -> int:
    """Print what ``measure`` reports of llm_magic (4 slots) and llama-server -np 4, both
    started and warmed up for it, and stopped after."""
    from llama_server import build

    binary = build()
    peer = LlamaServer(binary, embedded_model_path(), best_thread_count(), 4)
    host = ApiHost(use_token=False, port=0, tunnel="none").start()
    try:
        servers = {"llm_magic": host.url or "", "llama-server": peer.url}
        for url in servers.values():
            v1_completion(new_session(), url, 8)
        print(measure(servers))
    finally:
        host.stop()
        peer.stop()
    return 0


def only_prompt_reading(rounds: int) -> int:
    return beside_llama_server(lambda servers: report_prompt_reading(prompt_reading(servers, rounds)))


def clients_paired(servers: dict[str, str], rounds: int) -> dict[int, dict]:
    """4 and 16 streaming clients on llm_magic --parallel 4 and llama-server -np 4, the two
    taking turns round by round (one run of each varies by more than the gap): per client
    count, each server's tokens/s per round and the median of the rounds' ratios."""
    table = {}
    for clients in CLIENTS[1:]:
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(rounds):
            for name, url in rotated(servers, i):
                time.sleep(SETTLE_SECONDS)
                rates[name].append(concurrency(url, clients)["tokens_per_s"])
        table[clients] = {**rates, "paired": paired(rates["llm_magic"], rates["llama-server"])}
    return table


def report_clients_paired(table: dict) -> str:
    lines = []
    for clients, row in table.items():
        ratios = " ".join(f"{a / b:.3f}" for a, b in zip(row["llm_magic"], row["llama-server"]))
        lines.append(f"{clients} clients, llm_magic --parallel 4 vs llama-server -np 4, round by round: {ratios}; "
                     f"median {row['paired']:.3f}")
    return "\n".join(lines)


def only_clients(rounds: int) -> int:
    return beside_llama_server(lambda servers: report_clients_paired(clients_paired(servers, rounds)))


def report_prompt_reading(reading: dict) -> str:
    times = reading["ttft_ms"]
    lines = [f"{'a ' + str(reading['prompt_tokens']) + '-token prompt, first token':<34}{'ms':>10}{'vs llama-server':>17}"]
    lines += [f"  {name:<32}{ms:>10.0f}{ms / times[name.replace('llm_magic', 'llama-server')]:>17.3f}"
              for name, ms in times.items()]
    if reading.get("paired_vs_llama_server"):
        lines.append("  llm_magic vs llama-server, the median of each round's ratio: " + ", ".join(
            f"{beside} {ratio:.3f}" for beside, ratio in reading["paired_vs_llama_server"].items()))
    return "\n".join(lines)


def report(r: dict) -> str:
    t, o, f, chat, ratios = r["throughput_tokens_per_s"], r["one_token_ms"], r["ttft_ms"], r["long_chat"], r["ratios"]
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, llama-cpp-python {m['llama_cpp_python']}, "
             f"{m['date']}; model {r['model']}, {r['threads']} threads, greedy, flash attention", "",
             f"{'generation, ' + str(GEN_TOKENS) + ' tokens':<34}{'tokens/s':>10}{'vs in-process':>16}{'vs llama-server':>17}"]
    for name, rate in t.items():
        lines.append(f"  {name:<32}{rate:>10.1f}{rate / t['in-process']:>16.3f}{rate / t['llama-server']:>17.3f}")
    lines.append(f"  /v1 stream vs llama-server stream, the median of each round's ratio: "
                 f"{r['v1_stream_vs_llama_server_stream_paired']:.3f}")
    lines += ["", f"{'max_tokens=1 request':<34}{'ms':>10}{'overhead ms':>16}"]
    for name, ms in o.items():
        lines.append(f"  {name:<32}{ms:>10.1f}{ms - o['in-process']:>16.1f}")
    lines += ["", f"{'time to first streamed token':<34}{'ms':>10}"]
    lines += [f"  {name:<32}{ms:>10.1f}" for name, ms in f.items()]
    feats = r["features_tokens_per_s"]
    lines += ["", f"{'chat decode, by feature':<34}{'tokens/s':>10}{'vs plain':>16}"]
    lines += [f"  {name:<32}{rate:>10.1f}{rate / feats['plain']:>16.3f}" for name, rate in feats.items()]
    nc = r["n_choices"]
    lines += ["", f"n={nc['n']} answers in one request: {nc['n_s']:.2f} s ({nc['n_tokens']:.0f} tokens) against "
              f"{nc['one_s']:.2f} s ({nc['one_tokens']:.0f} tokens) for one: {ratios['n4_time_vs_one']:.2f}x the time"]
    lines += ["", f"long chat ({chat['prompt_tokens']} prompt tokens), next turn's first token: "
              f"warm {chat['warm_ttft_ms']:.0f} ms, cold {chat['cold_ttft_ms']:.0f} ms, "
              f"{ratios['kv_cache_speedup']:.1f}x faster with the KV cache", "",
              report_prompt_reading(r["prompt_reading"]), "",
              f"{'streaming clients, 64 tokens each':<34}{'clients':>8}{'errors':>7}{'tokens/s':>10}"
              f"{'ttft p50':>10}{'p95':>8}{'latency p50':>13}{'p95':>8}"]
    for name, rows in r["concurrency"].items():
        for c in rows:
            lines.append(f"  {name:<32}{c['clients']:>8}{c['errors']:>7}{c['tokens_per_s']:>10.1f}"
                         f"{c['ttft_p50_ms']:>10.0f}{c['ttft_p95_ms']:>8.0f}{c['p50_ms']:>13.0f}{c['p95_ms']:>8.0f}")
    if "clients_paired" in r:
        lines.append(report_clients_paired(r["clients_paired"]))
    lines += ["", report_speculation(r["speculation"])]
    if "step_ms" in r:
        lines += ["", report_step_costs(r["step_ms"])]
    lines += ["", report_neighbours(r["neighbours_ms"])]
    lines += ["", f"llm-magic serve to healthy: {r['startup_s']:.2f} s"]
    return "\n".join(lines)


def report_neighbours(times: dict) -> str:
    lines = [f"{'a 4-token request':<34}{'ms':>10}{'vs beside plain':>17}"]
    lines += [f"  {name:<32}{ms:>10.0f}{ms / times['beside plain']:>17.2f}" for name, ms in times.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
