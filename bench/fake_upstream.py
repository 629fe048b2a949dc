"""A fast stand-in for llama-server, for measuring what a proxy in front of it costs.

    python bench/fake_upstream.py PORT

POST /v1/chat/completions answers a small chat completion, or with "stream": true a
stream of 64 server-sent events, at once: whatever time and CPU a request costs beyond
direct access is the proxy's. Only for benchmarks; tests talk to real llama-servers.
"""

import gc
import json
import sys

from aiohttp import web

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": "x" * 64},
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
    }
).encode()
CHUNK = (
    "data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": "xxxx"}, "finish_reason": None}],
        }
    )
    + "\n\n"
).encode()
EVENTS = 64


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream": true' not in body and b'"stream":true' not in body:
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(EVENTS):
        await response.write(CHUNK)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    gc.disable()  # a collection here would be charged to whichever proxy is measured
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *_: None
    )


if __name__ == "__main__":
    main()
