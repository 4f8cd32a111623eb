"""Where the service's CPU goes: py-spy raw stacks (`py-spy record --format raw`) summarised two ways.

- by path: what the relay was doing (receiving a browser frame, the SDK's send_realtime_input, the SDK's
  receive(), sending to the browser, the upstream socket, the event loop itself, ...), from the frames
  on the stack;
- by work: the innermost recognised frame (permessage-deflate, pydantic, JSON, base64, TLS, WebSocket
  framing of each library, asyncio, logging, the app's own code).

    .venv/bin/python -m bench.profile bench/results/profile-....txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (label, predicate on the list of (func, file) frames, root first); first match wins.
PATHS: list[tuple[str, Any]] = [
    (
        "SDK send_realtime_input (browser frame → Gemini)",
        lambda st: _has(st, "send_realtime_input", "genai/live.py"),
    ),
    (
        "send_audio: pre-built JSON on the upstream websocket (browser frame → Gemini)",
        lambda st: _has(st, "send_audio", "gemini.py") or _has(st, "_forward_upstream"),
    ),
    (
        "SDK receive() / _receive (Gemini message → event)",
        lambda st: _has(st, "_receive", "genai/live.py") or _has(st, "receive", "genai/live.py"),
    ),
    (
        "sending to the browser (Starlette → server → WebSocket framing)",
        lambda st: (
            _has(st, "_write_client")
            or _has(st, "app_send", "hypercorn/")
            or (
                _has_file(st, "uvicorn/protocols/websockets")
                and _has(st, "send", "")
                and _has(st, "asgi_send")
            )
        ),
    ),
    (
        "reading browser frames (server → app reader)",
        lambda st: (
            _has(st, "_read_client")
            or _has_file(st, "hypercorn/protocol/ws_stream.py")
            or _has_file(st, "hypercorn/asyncio/tcp_server.py")
            or _has_file(st, "uvicorn/protocols/websockets")
        ),
    ),
    (
        "pump: upstream message → JSON → events → outbox",
        lambda st: _has(st, "_pump_upstream") or _has(st, "events", "gemini.py"),
    ),
    (
        "upstream socket (websockets client: read, frames, keepalive)",
        lambda st: _has_file(st, "websockets/"),
    ),
    ("TLS (asyncio sslproto)", lambda st: _has_file(st, "asyncio/sslproto.py")),
    (
        "database / sessions open+close",
        lambda st: _has_file(st, "asyncpg/") or _has_file(st, "aiosql/"),
    ),
    ("logging", lambda st: _has_file(st, "logging/")),
]

# Innermost frame → kind of work; checked from the leaf outwards, first recognised file wins.
WORK: list[tuple[str, str]] = [
    (
        "permessage-deflate (zlib)",
        r"wsproto/extensions\.py|websockets/extensions/permessage_deflate\.py|zlib",
    ),
    (
        "pydantic (model build/validate/dump)",
        r"pydantic|genai/_common\.py|genai/types\.py|genai/live_converters\.py|genai/_live_converters\.py",
    ),
    ("JSON", r"/json/|json/(encoder|decoder|__init__)\.py"),
    ("base64", r"base64\.py"),
    ("TLS (ssl)", r"(^|/)ssl\.py|asyncio/sslproto\.py"),
    ("wsproto framing", r"wsproto/"),
    ("websockets framing/connection", r"websockets/"),
    ("Hypercorn", r"hypercorn/"),
    ("Uvicorn", r"uvicorn/"),
    ("Starlette", r"starlette/"),
    ("logging", r"logging/"),
    ("asyncpg/aiosql", r"asyncpg/|aiosql/"),
    ("google-genai (other)", r"google/genai/"),
    (
        "app code",
        r"(^|/)(voice_ws|gemini|relay|transcripts|metrics|lifecycle|app|limits|tickets)\.py",
    ),
    ("asyncio event loop", r"asyncio/|selectors\.py"),
]
_WORK = [(label, re.compile(pattern)) for label, pattern in WORK]


def _parse_frame(text: str) -> tuple[str, str]:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip(), ""
    return m["func"], m["file"]


def _has(stack: list[tuple[str, str]], func: str, file: str = "") -> bool:
    return any(f == func or f.endswith("." + func) for f, fl in stack if file in fl)


def _has_file(stack: list[tuple[str, str]], file: str) -> bool:
    return any(file in fl for _, fl in stack)


def _work(stack: list[tuple[str, str]]) -> str:
    for func, file in reversed(stack):
        for label, pattern in _WORK:
            if pattern.search(file) or (label.startswith("perm") and "compress" in func):
                return label
    return "other"


def parse(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    out = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [_parse_frame(f) for f in stack_text.split(";") if f]
        out.append((frames, int(count)))
    return out


def summarise(text: str, top: int = 15) -> dict[str, Any]:
    samples = parse(text)
    total = sum(c for _, c in samples) or 1
    by_path: Counter[str] = Counter()
    by_work: Counter[str] = Counter()
    cross: Counter[tuple[str, str]] = Counter()
    leaf: Counter[str] = Counter()
    for stack, count in samples:
        path = next((label for label, pred in PATHS if pred(stack)), "event loop & other")
        work = _work(stack)
        by_path[path] += count
        by_work[work] += count
        cross[(path, work)] += count
        if stack:
            func, file = stack[-1]
            leaf[f"{func} ({file.split('site-packages/')[-1]})"] += count

    def share(counter: Counter[Any]) -> list[list[Any]]:
        return [[k, round(100.0 * v / total, 1)] for k, v in counter.most_common()]

    return {
        "samples": total,
        "by_path": share(by_path),
        "by_work": share(by_work),
        "path_x_work": [[p, w, round(100.0 * v / total, 1)] for (p, w), v in cross.most_common(25)],
        "top_leaf_functions": [[k, round(100.0 * v / total, 1)] for k, v in leaf.most_common(top)],
    }


def markdown_breakdown(b: dict[str, Any]) -> str:
    lines = [
        f"{b['samples']} samples (on-CPU only)",
        "",
        "| by path | % of service CPU |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in b["by_path"]]
    lines += ["", "| by work (innermost recognised frame) | % |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in b["by_work"]]
    lines += ["", "| path × work (top 25) | | % |", "|---|---|---:|"]
    lines += [f"| {p} | {w} | {v} |" for p, w, v in b["path_x_work"]]
    lines += ["", "| hottest leaf functions (self time) | % |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in b["top_leaf_functions"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    for path in argv:
        with open(path) as f:
            print(f"## {path}\n")
            print(markdown_breakdown(summarise(f.read())))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
