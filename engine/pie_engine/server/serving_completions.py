"""POST /v1/completions (streaming and not)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pie_engine.core.output_processor import RequestOutput
from pie_engine.server.async_engine import RequestGroup
from pie_engine.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from pie_engine.server.serving import ApiError, BaseServing, SSEResponse, choice_index, sse, until_disconnected


class CompletionServing(BaseServing):
    def _prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        # One prompt (a string or token ids) or a list of them.
        many = cast("list[str | list[int]]", [p] if isinstance(p, str) or p and isinstance(p[0], int) else p)
        if not many or any(len(x) == 0 for x in many):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        prompts = [self.llm.tokenize(x) for x in many]
        if any(not ids for ids in prompts):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return prompts

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.max_tokens is not None:
            self.check_max_tokens(req.max_tokens, "max_tokens")
        # Off the event loop: tokenizing a huge prompt takes seconds, and the other requests must not wait for it.
        prompts = await asyncio.to_thread(self._prompts, req)
        max_tokens = req.max_tokens
        if max_tokens is None:  # explicit null: as much as fits after the longest prompt
            max_tokens = max(self.llm.max_model_len - max(len(p) for p in prompts), 1)
        params = self.make_params(lambda: req.to_sampling_params(max_tokens, req.logprobs))
        rid = random_id("cmpl")
        group = self.start(rid, prompts, params, req.n)
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(rid, req, group, prompt_tokens, include_usage), group)
        try:
            finals = await until_disconnected(raw, _collect(group))
        finally:
            group.close()
        outputs, logprobs = finals
        choices = sorted((CompletionChoice(
            index=choice_index(o.request_id), text=o.text, finish_reason=o.finish_reason,
            logprobs=self._logprobs(o.token_ids, logprobs[o.request_id]) if req.logprobs is not None else None)
            for o in outputs), key=lambda c: c.index)
        completion = sum(len(o.token_ids) for o in outputs)
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                          total_tokens=prompt_tokens + completion)
        return JSONResponse(CompletionResponse(id=rid, model=self.model_name, choices=choices,
                                               usage=usage).model_dump())

    async def _stream(self, rid: str, req: CompletionRequest, group: RequestGroup, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        completion = 0
        offsets: dict[str, int] = {}
        async for o in group:
            completion += len(o.delta_token_ids)
            if not (o.delta_text or o.finished or o.delta_logprobs):
                continue  # a token that only completed part of a character: nothing to show yet
            lp = None
            if req.logprobs is not None:
                lp = self._logprobs(o.delta_token_ids, o.delta_logprobs, offsets.get(o.request_id, 0))
                offsets[o.request_id] = offsets.get(o.request_id, 0) + sum(map(len, lp.tokens))
            choice = CompletionChoice(index=choice_index(o.request_id), text=o.delta_text, logprobs=lp,
                                      finish_reason=o.finish_reason if o.finished else None)
            yield sse(CompletionResponse(id=rid, model=self.model_name, choices=[choice]))
        if include_usage:
            usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                              total_tokens=prompt_tokens + completion)
            yield sse(CompletionResponse(id=rid, model=self.model_name, choices=[], usage=usage))

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]],
                  start_offset: int = 0) -> CompletionLogprobs:
        """Legacy completions logprobs: one entry per token (chosen token's logprob, top-N as {token: logprob})."""
        out = CompletionLogprobs()
        offset = start_offset
        for tid, lp in zip(token_ids, logprobs, strict=False):
            tok = self.token_str(tid)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.get(tid))
            out.top_logprobs.append({self.token_str(t): v for t, v in lp.items()})
            out.text_offset.append(offset)
            offset += len(tok)
        return out


async def _collect(group: RequestGroup) -> tuple[list[RequestOutput], dict[str, list[dict[int, float]]]]:
    """Final outputs of every request in ``group`` and each one's per-token logprobs."""
    finals: list[RequestOutput] = []
    logprobs: dict[str, list[dict[int, float]]] = {}
    async for o in group:
        logprobs.setdefault(o.request_id, []).extend(o.delta_logprobs)
        if o.finished:
            finals.append(o)
    return finals, logprobs
