"""The built-in echo model: answers OpenAI requests by itself when no ``proxy_url`` is set.

It repeats the words of the prompt (the last user message for chat), at most ``max_tokens``
of them, and counts words as tokens for the ``usage`` object. Pure functions: the ASGI app in
:mod:`mesh_llm_openai_proxy.app` turns them into responses and SSE streams.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

DEFAULT_MAX_TOKENS = 64
ECHO_PREFIX = "echo:"


class RequestError(ValueError):
    """A request the echo model cannot answer (HTTP 400, OpenAI error shape)."""


def _content_text(content: Any) -> str:
    """The text of a message's ``content``: a string or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {value!r:.40}")
    return value


def _chat_prompt(body: dict[str, Any]) -> tuple[str, str]:
    """(all the prompt's text, the last user message's text)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    texts, last_user = [], ""
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("every message must be an object")
        text = _content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    return " ".join(texts), last_user


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return " ".join(prompt)
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string or a list of strings")
    return prompt


class EchoReply:
    """One answer of the echo model to a chat or completion request."""

    def __init__(self, body: dict[str, Any], *, model: str, chat: bool) -> None:
        if chat:
            prompt, source = _chat_prompt(body)
        else:
            prompt = source = _completion_prompt(body)
        limit = _max_tokens(body)
        words = [ECHO_PREFIX, *source.split()]
        self.tokens = [w if i == 0 else f" {w}" for i, w in enumerate(words[:limit])]
        self.finish_reason = "stop" if len(words) <= limit else "length"
        self.chat = chat
        self.model = str(body.get("model") or model)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-echo-{uuid.uuid4().hex[:12]}"
        self.created = int(time.time())
        self.usage = {"prompt_tokens": len(prompt.split()),
                      "completion_tokens": len(self.tokens),
                      "total_tokens": len(prompt.split()) + len(self.tokens)}

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self) -> dict[str, Any]:
        """The whole (non-streamed) response body."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason,
                                      "message": {"role": "assistant", "content": self.text}}
        else:
            choice = {"index": 0, "finish_reason": self.finish_reason, "text": self.text,
                      "logprobs": None}
        return {**self._head(), "choices": [choice], "usage": dict(self.usage)}

    def _chunk(self, piece: str | None, finish: str | None, *, first: bool = False,
               usage: bool = False) -> dict[str, Any]:
        head = self._head()
        if self.chat:
            head["object"] = "chat.completion.chunk"
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece is not None:
                delta["content"] = piece
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish,
                      "logprobs": None}
        chunk = {**head, "choices": [choice]}
        if usage:
            chunk["usage"] = dict(self.usage)
        return chunk

    def sse(self) -> Iterator[bytes]:
        """The streamed response: one SSE event per token, the last one carries ``usage``,
        then ``data: [DONE]``."""
        for i, token in enumerate(self.tokens):
            yield _event(self._chunk(token, None, first=i == 0))
        yield _event(self._chunk(None, self.finish_reason, usage=True))
        yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
