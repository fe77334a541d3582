"""Async chat-completions client for one replica: bounded concurrency, per-request
timeouts, backoff retries for failures that certainly ran nothing.

Outcomes (``Outcome.kind``) matter for exactly-once capture:
  ok         200: generated; the plugin commits the sequence shortly after.
  refused    connection refused / 503 / 429 after ``retries`` backoff retries: nothing ran.
  rejected   other 4xx (e.g. prompt too long): nothing ran; the prompt fails for good.
  uncertain  other 5xx, timeout or a connection dropped mid-request: the server may have
             run (and, aborting, captured) part of it — resolved against the store once the
             replica is quiet, never re-sent blindly.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import aiohttp

from .ledger import request_id
from .prompts import Prompt


@dataclass
class Outcome:
    kind: str                 # ok | refused | rejected | uncertain
    error: str = ""
    retries: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class FeedConfig:
    model: str
    max_tokens: int = 256
    temperature: float = 0.0
    timeout_s: float = 600.0
    retries: int = 4
    backoff_s: float = 0.5    # first backoff; doubles, with jitter, up to 30 s


async def chat(session: aiohttp.ClientSession, url: str, prompt: Prompt, cfg: FeedConfig) -> Outcome:
    body = {"model": cfg.model, "messages": list(prompt.messages), "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature}
    headers = {"X-Request-Id": request_id(prompt.prompt_id)}
    retries = 0
    while True:
        try:
            async with session.post(url + "/v1/chat/completions", json=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as r:
                text = await r.text()
                if r.status == 200:
                    try:
                        usage = (await r.json(content_type=None)).get("usage") or {}
                    except ValueError:
                        usage = {}
                    return Outcome("ok", retries=retries, completion_tokens=int(usage.get("completion_tokens", 0)))
                err = f"HTTP {r.status}: {text[:300]}"
                if r.status in (429, 503):
                    kind = "refused"
                elif 400 <= r.status < 500:
                    return Outcome("rejected", err, retries)
                else:
                    return Outcome("uncertain", err, retries)
        except aiohttp.ClientConnectorError as e:  # never reached the server
            kind, err = "refused", f"connection error: {e}"
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            return Outcome("uncertain", f"{type(e).__name__}: {e}", retries)
        if retries >= cfg.retries:
            return Outcome(kind, err, retries)
        await asyncio.sleep(min(30.0, cfg.backoff_s * 2 ** retries) * (0.5 + random.random()))
        retries += 1


async def running_requests(session: aiohttp.ClientSession, url: str) -> int | None:
    """Requests running or waiting in a replica (vLLM's /metrics); None if unreachable."""
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
