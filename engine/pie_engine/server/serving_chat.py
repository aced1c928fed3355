"""POST /v1/chat/completions (streaming and not): messages -> the model's chat template -> a completion."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pie_engine.server.async_engine import RequestGroup
from pie_engine.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    random_id,
)
from pie_engine.server.serving import ApiError, BaseServing, SSEResponse, choice_index, sse, until_disconnected
from pie_engine.server.serving_completions import _collect


class ChatServing(BaseServing):
    def _prompt(self, req: ChatCompletionRequest) -> list[int]:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        except Exception as e:  # a template's raise_exception (e.g. roles must alternate) is the client's error
            raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        # NOTE: the rendered template already contains BOS where the model wants it.
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if req.max_completion_tokens is not None:
            self.check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
        elif req.max_tokens is not None:
            self.check_max_tokens(req.max_tokens, "max_tokens")
        prompt = await asyncio.to_thread(self._prompt, req)  # off the event loop, as completions do
        max_tokens = req.max_completion_tokens or req.max_tokens or max(self.llm.max_model_len - len(prompt), 1)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.make_params(lambda: req.to_sampling_params(max_tokens, logprobs))
        rid = random_id("chatcmpl")
        group = self.start(rid, [prompt], params, req.n)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(rid, req, group, len(prompt), include_usage), group)
        try:
            outputs, lps = await until_disconnected(raw, _collect(group))
        finally:
            group.close()
        choices = sorted((ChatChoice(
            index=choice_index(o.request_id), message=ChatResponseMessage(content=o.text),
            finish_reason=o.finish_reason,
            logprobs=self._logprobs(o.token_ids, lps[o.request_id], logprobs or 0) if req.logprobs else None)
            for o in outputs), key=lambda c: c.index)
        completion = sum(len(o.token_ids) for o in outputs)
        usage = UsageInfo(prompt_tokens=len(prompt), completion_tokens=completion,
                          total_tokens=len(prompt) + completion)
        return JSONResponse(ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                                   usage=usage).model_dump())

    async def _stream(self, rid: str, req: ChatCompletionRequest, group: RequestGroup, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=rid, model=self.model_name, choices=choices, usage=usage))

        # The first chunk of each choice announces the role, as OpenAI does.
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(req.n)])
        completion = 0
        async for o in group:
            completion += len(o.delta_token_ids)
            if not (o.delta_text or o.finished or o.delta_logprobs):
                continue
            lp = self._logprobs(o.delta_token_ids, o.delta_logprobs, req.top_logprobs or 0) if req.logprobs else None
            yield chunk([ChatChunkChoice(index=choice_index(o.request_id), logprobs=lp,
                                         delta=DeltaMessage(content=o.delta_text or None),
                                         finish_reason=o.finish_reason if o.finished else None)])
        if include_usage:
            yield chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                      total_tokens=prompt_tokens + completion))

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int) -> ChatLogprobs:
        content = []
        for tid, lp in zip(token_ids, logprobs, strict=False):
            tok = self.token_str(tid)
            top = [TopLogprob(token=(s := self.token_str(t)), logprob=v, bytes=list(s.encode()))
                   for t, v in sorted(lp.items(), key=lambda kv: -kv[1])]
            content.append(ChatTokenLogprob(token=tok, logprob=lp[tid], bytes=list(tok.encode()),
                                            top_logprobs=top[:top_n]))
        return ChatLogprobs(content=content)
