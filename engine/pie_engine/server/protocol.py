"""OpenAI-compatible request/response bodies (completions, chat completions, models, errors).

Field names and shapes follow the OpenAI API; ``top_k``, ``ignore_eos`` and ``stop_token_ids`` are vLLM
extensions. Unknown request fields are ignored (clients send many optional ones); known sampling fields this engine
does not implement (penalties, ``logit_bias``) accept only their neutral value.

Request fields are strict: a boolean, a string or a float is not an integer (not even 2.0: OpenAI rejects it too,
though JSON Schema's "integer" admits it), NaN/Infinity are not numbers, and a string must be valid Unicode (no lone
UTF-16 surrogates such as JSON ``"\\ud800"``). Anything else is a 400 that names the field, before any of it reaches
the tokenizer or the engine thread (where a bad value would be a 500, or kill the thread that serves every request).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from pie_engine.core.sampling_params import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_STOP = 16  # stop strings per request: each is searched for after every token
MAX_STOP_TOKEN_IDS = 256


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _valid_unicode(s: str) -> str:
    # JSON may spell a lone surrogate ("\ud800"); Python keeps it, but it is no character: the tokenizer raises
    # TypeError on it and no response containing it can be encoded as UTF-8.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode: lone surrogate {s[e.start]!r} at position {e.start}") from None
    return s


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1), AfterValidator(_valid_unicode)]
# Below the vocabulary size too, which the engine checks and the server's OpenAPI schema states.
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingRequest(_Request):
    """Fields shared by both endpoints, and their translation into SamplingParams."""

    model: Text
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    # -1 or 0: disabled; a k beyond the vocabulary keeps every token. Bounded: the sampler puts it in a tensor.
    top_k: StrictInt | None = Field(default=None, ge=-1, le=INT32_MAX)
    n: StrictInt = Field(default=1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    frequency_penalty: StrictFloat | None = Field(default=None, ge=0.0, le=0.0,
                                                  description="not implemented: only 0 is accepted")
    presence_penalty: StrictFloat | None = Field(default=None, ge=0.0, le=0.0,
                                                 description="not implemented: only 0 is accepted")
    repetition_penalty: StrictFloat | None = Field(default=None, ge=1.0, le=1.0,
                                                   description="not implemented: only 1 is accepted")
    # Rejected rather than ignored when set: dropping a bias silently would change the output behind the client's back.
    logit_bias: Annotated[dict[str, StrictFloat], Field(max_length=0)] | None = Field(
        default=None, description="not implemented: only {} is accepted")
    user: Text | None = None

    def to_sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_k=-1 if self.top_k in (None, 0) else self.top_k, top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs)


class CompletionRequest(_SamplingRequest):
    # One prompt (text or token ids) or a batch of them.
    prompt: NonEmptyText | TokenIds | Annotated[list[NonEmptyText], Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]
    # No upper bound here: anything beyond the context is answered with the model's maximum context length.
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False


class ContentPart(_Request):
    """One part of a chat message's content: only text parts are supported."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        """Plain text of the message."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: StrictBool = True


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ------------------------------------------------------------------------------------------------ completions
class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------------------ chat
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pie"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
