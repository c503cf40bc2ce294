"""Python client for Realm's API: HTTP (OpenAI-compatible, with SSE streaming) and WebSocket streams.

    from realm_client import RealmClient
    with RealmClient("http://127.0.0.1:8000", api_key="...") as client:
        print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)

`AsyncRealmClient` has the same methods for asyncio. Refusals raise typed `RealmError`s.
"""

from .client import AsyncRealmClient, AsyncStream, RealmClient, Stream
from .errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RealmError,
    ServerError,
)
from .types import (
    Choice,
    Chunk,
    Completion,
    GenerationParams,
    ModelInfo,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
    join_tool_calls,
)
from .ws import AsyncGeneration, AsyncWebSocketSession, Generation, WebSocketSession

__all__ = [
    "APIConnectionError", "AsyncGeneration", "AsyncRealmClient", "AsyncStream", "AsyncWebSocketSession",
    "AuthenticationError", "BadRequestError", "Choice", "Chunk", "Completion", "GenerationParams", "Generation",
    "ModelInfo", "NotFoundError", "PermissionDeniedError", "RateLimitError", "RealmClient", "RealmError",
    "ServerError", "Stream", "TokenLogprob", "ToolCall", "ToolCallDelta", "Usage", "WebSocketSession",
    "join_tool_calls",
]
