"""A pool of language servers for one sender: which server takes a sequence.

Members come from a list of `HOST:PORT`, or from DNS (`dns:NAME:PORT`: the A records of NAME, for
example a Kubernetes headless Service, resolved again every `resolve_seconds`). Each member has
one `LanguageClient` (one channel and one shared stream). The pool reads every member's load
with the `language` model's `op=load` (open sequences, the tokens they may still cost, whether the
server drains) from a background thread every `load_seconds` while requests come, so choosing
costs no round trip.

Choice (`choose`): the members that answered their last load call and do not drain, ordered by
rendezvous hashing of the request's key (a conversation's key sends each turn to the same server,
whose caches then hold it), and the first of them that is not overloaded takes the sequence:
"overloaded" is at or past `balance` times the mean load, the load being the open sequences
other senders hold there (the server's figure) plus the sequences this sender started there
that are open or began within the last `recent_seconds` (so a burst spreads before the next
load figure arrives). That bounds every server to about `balance` times the mean (consistent
hashing with bounded loads). When every member is overloaded, the one with the fewest sequences
and then tokens takes it.
"""

from __future__ import annotations

import collections
import hashlib
import math
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from qwen3vl_triton.errors import Unavailable

DNS_PREFIX = "dns:"


def parse_urls(text: str, name: str = "language_urls") -> tuple[list[str], tuple[str, int] | None]:
    """`HOST:PORT[,HOST:PORT...]` -> (urls, None), or `dns:NAME:PORT` -> ([], (NAME, PORT)).
    ValueError naming `name` for anything else."""
    text = text.strip()
    if text.startswith(DNS_PREFIX):
        host, sep, port = text[len(DNS_PREFIX):].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "," in host:
            raise ValueError(f"{name}: expected dns:NAME:PORT (one name), got {text!r}")
        return [], (host, int(port))
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"{name}: expected HOST:PORT[,HOST:PORT...] or dns:NAME:PORT, got {text!r}")
    for url in urls:
        host, sep, port = url.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{name}: {url!r} is not HOST:PORT")
    if len(set(urls)) != len(urls):
        raise ValueError(f"{name}: a server is listed twice in {text!r}")
    return urls, None


@dataclass(eq=False)
class Member:
    url: str
    lang: object  # LanguageClient
    prober: object  # LanguageClient for the load calls (a short timeout, its own stream)
    ready: bool = True
    draining: bool = False
    reported: int = 0  # open sequences at the last load call (every sender's)
    tokens: int = 0  # the tokens they may still cost
    mine_at_report: int = 0  # this sender's open sequences when that figure came
    open: int = 0  # this sender's open sequences here
    recent: collections.deque = field(default_factory=collections.deque)  # (start time, key) of ours
    error: str | None = None  # why the last load call failed

    def load(self, now: float, recent_seconds: float, key: bytes = b"") -> int:
        """Open sequences here, as `key`'s conversation sees them: its own recent turns (ended, or
        the one before) are no load against it, or a conversation would move on its second turn."""
        while self.recent and now - self.recent[0][0] > recent_seconds:
            self.recent.popleft()
        recent = sum(1 for _, k in self.recent if not key or k != key)
        return max(self.reported - self.mine_at_report, 0) + max(self.open, recent)


def rendezvous(key: bytes, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\0" + url.encode(), digest_size=8).digest(), "big")


class LanguagePool:
    def __init__(self, urls: str | list[str], timeout: float = 120.0, load_seconds: float = 0.25,
                 resolve_seconds: float = 5.0, balance: float = 1.15, recent_seconds: float = 5.0,
                 probe_timeout: float = 2.0, client_factory=None):
        from qwen3vl_triton.transfer.sender import LanguageClient

        self._factory = client_factory or (lambda url, t: LanguageClient(url, timeout=t))
        self.timeout, self.probe_timeout = timeout, probe_timeout
        self.load_seconds, self.resolve_seconds = load_seconds, resolve_seconds
        self.balance, self.recent_seconds = balance, recent_seconds
        text = ",".join(urls) if isinstance(urls, (list, tuple)) else urls
        self.static, self.dns = parse_urls(text)
        self.members: dict[str, Member] = {}
        self._lock = threading.Lock()
        self._resolved_at = -math.inf
        self._loaded_at = -math.inf
        self._wanted = threading.Event()  # a request came: keep the load figures fresh
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._resolve()

    # -- members --------------------------------------------------------------------------------
    def _addresses(self) -> list[str]:
        if self.dns is None:
            return list(self.static)
        name, port = self.dns
        try:
            infos = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror:
            return []  # none for now (a Service without ready pods); the old members stay until then
        return sorted({f"{info[4][0]}:{port}" for info in infos})

    def _resolve(self) -> None:
        urls = self._addresses()
        self._resolved_at = time.monotonic()
        if self.dns is not None and not urls:
            return
        with self._lock:
            gone = [m for u, m in self.members.items() if u not in urls]
            for url in urls:
                if url not in self.members:
                    self.members[url] = Member(url, self._factory(url, self.timeout),
                                               self._factory(url, self.probe_timeout))
            for m in gone:
                del self.members[m.url]
        for m in gone:
            self._close_member(m)

    @staticmethod
    def _close_member(m: Member) -> None:
        for client in (m.lang, m.prober):
            try:
                client.close(cancel=True)
            except Exception:  # noqa: BLE001 -- closing a dead server's channel
                pass

    # -- load -----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Ask every member for its load now (and resolve DNS again when due)."""
        if self.dns is not None and time.monotonic() - self._resolved_at > self.resolve_seconds:
            self._resolve()
        with self._lock:
            members = list(self.members.values())
        for m in members:
            mine = m.open
            try:
                sequences, tokens, draining = m.prober.load()
            except Exception as exc:  # noqa: BLE001 -- a dead or stopping server: not ready
                m.ready, m.error = False, str(exc)
                continue
            m.reported, m.tokens, m.draining, m.mine_at_report = sequences, tokens, draining, mine
            m.ready, m.error = not draining, None
        self._loaded_at = time.monotonic()

    def _loop(self) -> None:
        while not self._closed.is_set():
            if not self._wanted.wait(1.0):
                continue
            self._wanted.clear()
            self.refresh()
            self._closed.wait(self.load_seconds)

    def _keep_fresh(self) -> None:
        if self._thread is None:
            with self._thread_lock:
                if self._thread is None:
                    self.refresh()  # the first choice waits for real figures
                    self._thread = threading.Thread(target=self._loop, name="language-load", daemon=True)
                    self._thread.start()
        self._wanted.set()

    # -- choice ---------------------------------------------------------------------------------
    def choose(self, key: bytes = b"", avoid=()) -> Member:
        """The member for a sequence whose conversation key is `key` (empty: a random one), not
        one of `avoid` (where it just failed) unless no other is ready."""
        self._keep_fresh()
        with self._lock:
            members = list(self.members.values())
        ready = [m for m in members if m.ready and m not in avoid] or [m for m in members if m.ready]
        if not ready:
            why = "; ".join(f"{m.url}: {'draining' if m.draining else m.error or 'not ready'}" for m in members)
            raise Unavailable(f"no language server is ready ({why or 'none found'})")
        now = time.monotonic()
        loads = {m: m.load(now, self.recent_seconds, key) for m in ready}
        key = key or secrets.token_bytes(16)
        cap = math.ceil(self.balance * (sum(loads.values()) + 1) / len(ready))
        for m in sorted(ready, key=lambda m: rendezvous(key, m.url), reverse=True):
            if loads[m] < cap:
                return m
        return min(ready, key=lambda m: (loads[m], m.tokens))

    def started(self, m: Member, key: bytes = b"") -> None:
        """A sequence of conversation `key` started on `m`."""
        m.open += 1
        m.recent.append((time.monotonic(), key))

    def finished(self, m: Member) -> None:
        m.open -= 1

    def failed(self, m: Member, why: str) -> None:
        """`m` failed a sequence: not ready until a load call says otherwise."""
        m.ready, m.error = False, why
        self._wanted.set()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            members, self.members = list(self.members.values()), {}
        for m in members:
            self._close_member(m)


def conversation_key(conversation_id=None, messages=None, prompt=None, images=()) -> bytes:
    """The key that sends a conversation's turns to one language server: `conversation_id` when
    given, else a hash of the conversation's first user message (its text and images: every later
    turn repeats it), else of the prompt and its images."""
    h = hashlib.blake2b(digest_size=16)
    if conversation_id:
        h.update(b"id\0" + _bytes(conversation_id))
        return h.digest()
    if messages is not None:
        import json

        try:
            parsed = json.loads(messages) if isinstance(messages, (str, bytes)) else messages
            first = next((m for m in parsed if isinstance(m, dict) and m.get("role") == "user"), None)
        except (ValueError, TypeError):
            first = None
        if first is not None:
            h.update(b"msg")
            content = first.get("content")
            for part in content if isinstance(content, list) else [content]:
                if isinstance(part, dict):  # its text or its image's URL (data URLs: the image itself)
                    value = part.get("text") or part.get("image_url") or part.get("image") or ""
                    part = value.get("url", "") if isinstance(value, dict) else value
                h.update(b"\0" + _bytes(part if isinstance(part, (str, bytes)) else repr(part)))
            return h.digest()
    h.update(b"prompt\0" + _bytes(prompt or b""))
    for image in images:
        h.update(b"\0" + hashlib.blake2b(_bytes(image), digest_size=16).digest())
    return h.digest()


def _bytes(value) -> bytes:
    if isinstance(value, np.generic):
        value = value.item()
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)
