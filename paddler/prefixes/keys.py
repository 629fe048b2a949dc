"""A request's prefix identity: hashes of its prompt's growing prefixes, cheap and bounded.

A chat request's prefixes end at message boundaries (a conversation's next turn starts
with the whole previous turn; a shared system prompt is its own first message); a plain
prompt's end at every BLOCK characters. Each key hashes everything before it, so equal
keys mean equal prefixes. Only the first LIMIT characters count, and at most MAX_KEYS
keys are kept (the longest ones: they say the most). The hash is the same in every
process (blake2b, not Python's randomised hash), since every worker shares the index.
"""

import hashlib
from typing import Any, Final

BLOCK: Final = 512
LIMIT: Final = 64 * 1024
MAX_KEYS: Final = 48


def _text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (their text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\x1e".join(
            str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def _pieces(payload: dict[str, Any]) -> list[str]:
    messages = payload.get("messages")
    if isinstance(messages, list):
        pieces = []
        for message in messages:  # a loop, not a comprehension: no call per request
            if isinstance(message, dict):
                content = message.get("content")
                text = content if isinstance(content, str) else _text(content)
                pieces.append(f"{message.get('role', '')}\x1f{text}\x1d")
            else:
                pieces.append(f"{message}\x1d")
        return pieces
    prompt = payload.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(map(str, prompt))  # token ids, or several prompts
    if isinstance(prompt, str):
        text = prompt[:LIMIT]
        return [text[start : start + BLOCK] for start in range(0, len(text), BLOCK)]
    return []


# Copied for each request: a copy costs less than a new hash object made with its
# digest size as a keyword argument.
_EMPTY: Final = hashlib.blake2b(digest_size=8)


def prefix_keys(payload: dict[str, Any]) -> list[tuple[int, int]]:
    """(key, length in characters) of every prefix, shortest first."""
    keys: list[tuple[int, int]] = []
    digest = _EMPTY.copy()
    length = 0
    for whole in _pieces(payload):
        if length >= LIMIT:
            break
        piece = whole[: LIMIT - length]
        digest.update(piece.encode("utf-8", "surrogatepass"))
        length += len(piece)
        keys.append((int.from_bytes(digest.copy().digest(), "little") or 1, length))
    return keys[-MAX_KEYS:]


def session_key(session: str) -> int:
    """A sticky session (a header, or the request's "user") as a key of its own."""
    digest = hashlib.blake2b(b"session\x00" + session.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1
