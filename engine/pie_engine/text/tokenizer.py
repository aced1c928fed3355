"""Tokenizer: HF ``tokenizer.json`` through the ``tokenizers`` library, chat templates through jinja2.

No transformers at runtime. Special tokens and the chat template come from ``tokenizer_config.json`` (or the
``chat_template.jinja`` file newer transformers versions write); EOS ids are the union of the model config's,
the generation config's and the tokenizer's, because Llama-3-style models end turns with several ids.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def _token_content(value: Any) -> str | None:
    """tokenizer_config special tokens are a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's builtin tojson HTML-escapes; HF templates expect plain JSON (as transformers renders it).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """Text <-> token ids for one model directory."""

    def __init__(self, tok: tokenizers.Tokenizer, special_tokens: dict[str, str], eos_token_ids: set[int],
                 bos_token_id: int | None, chat_template: str | None) -> None:
        self._tok = tok
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir} (only fast HF tokenizers are supported)")
        tok = tokenizers.Tokenizer.from_file(str(path))
        tcfg = _read_json(model_dir / "tokenizer_config.json")
        special = {key: content for key in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if (content := _token_content(tcfg.get(key))) is not None}
        eos = _ids(_read_json(model_dir / "config.json").get("eos_token_id"))
        eos |= _ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        if "eos_token" in special and (tid := tok.token_to_id(special["eos_token"])) is not None:
            eos.add(tid)
        bos = tok.token_to_id(special["bos_token"]) if "bos_token" in special else None
        if bos is None:
            bos = _read_json(model_dir / "config.json").get("bos_token_id")
        return cls(tok, special, eos, bos, cls._find_chat_template(model_dir, tcfg))

    @staticmethod
    def _find_chat_template(model_dir: Path, tcfg: dict[str, Any]) -> str | None:
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template:
            return template
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        return _read_json(model_dir / "chat_template.json").get("chat_template")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the tokenizer's eos_token), else any of ``eos_token_ids``."""
        tid = self._tok.token_to_id(self.special_tokens["eos_token"]) if "eos_token" in self.special_tokens else None
        if tid is not None:
            return tid
        return min(self.eos_token_ids) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # NOTE: encode_batch releases the GIL (encode holds it): a megabyte prompt tokenized off the event loop then
        # stalls neither the server's other requests nor the engine thread.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the model's chat template. NOTE: templates usually contain the BOS token themselves, so encode
        the result with ``add_special_tokens=False`` (as HF's ``apply_chat_template(tokenize=True)`` does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template); "
                             "use the completions API instead")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(self.chat_template)
        normalized = [{**m, "content": _text_content(m.get("content"))} for m in messages]
        return self._template.render(messages=normalized, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens, **kwargs)


def _text_content(content: Any) -> Any:
    """OpenAI content parts [{"type": "text", "text": ...}] -> one string (templates expect a string)."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content
