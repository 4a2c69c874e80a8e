"""Tokenizer for a Hugging Face model directory: encode/decode, chat template, streaming text.

``Tokenizer`` wraps ``tokenizers.Tokenizer`` with what ``tokenizer_config.json`` adds (special
tokens, add_bos/add_eos, chat templates) so that ``encode`` matches ``AutoTokenizer`` and
``apply_chat_template`` matches transformers' rendering. Streaming text with stop strings is
moeserve.detokenizer's.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from moeserve.chat_template import ChatTemplateRenderer


class Tokenizer:
    """Encoding, decoding and chat templating for one model.

    ``encode(text)`` equals ``AutoTokenizer.from_pretrained(dir)(text)["input_ids"]``;
    ``decode`` is the ``tokenizers`` decode (no ``clean_up_tokenization_spaces``).
    ``vocab_size`` counts added tokens.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_templates: dict[str, str] | None = None,
        name: str = "tokenizer",
    ) -> None:
        self._tok = backend
        self.name = name
        # bos_token, eos_token, unk_token, pad_token...: passed to chat templates by name.
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self._templates: dict[str, str] = dict(chat_templates or {})
        self._renderer = ChatTemplateRenderer()
        # The most prompt bytes one token can stand for (None: no sound bound), for a cheap
        # lower bound on a prompt's length before tokenising it.
        self.bytes_per_token = _bytes_per_token(json.loads(backend.to_str()))
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self.special_tokens.get("eos_token"))
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        named = (self._id_of(t) for t in self.special_tokens.values())
        self.all_special_ids: set[int] = special | {i for i in named if i is not None}
        self.vocab_size: int = max(
            backend.get_vocab_size(with_added_tokens=True),
            1 + max(backend.get_added_tokens_decoder(), default=-1),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` / chat templates
        (optional) from a model directory; ``ValueError`` naming the file when one is bad."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{tok_file} not found: a tokenizer.json is required")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise ValueError(f"{tok_file} is not a valid tokenizer.json: {exc}") from exc
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise ValueError(f"{cfg_file} must hold a JSON object")
        special = {
            key: text
            for key, value in config.items()
            if key.endswith("_token") and (text := _token_text(value)) is not None
        }
        # Like transformers: special tokens named in the config but missing from the vocab
        # are added, so their ids exist.
        missing = [t for t in special.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in missing])
        if "add_bos_token" in config or "add_eos_token" in config:
            # transformers (v5) rebuilds the post-processor from these flags when present.
            add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            backend.post_processor = _bos_eos_processor(backend, special, add_bos, add_eos)
        templates = _load_templates(path, config.get("chat_template"), cfg_file)
        return cls(backend, special_tokens=special, chat_templates=templates, name=str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor adds BOS etc."""
        if len(text) > 4096:
            # encode_batch releases the GIL, so a huge prompt tokenised in a worker thread
            # does not stall the server's event loop; plain encode holds it throughout.
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's token sequence as it would start a text and, where it tokenises to a
        different first token of the same length, as it would follow a space (vLLM's rule, so
        that `bad_words` bans a word in the middle of a text too). ValueError for a word with
        no tokens."""
        out: list[list[int]] = []
        for word in words:
            plain = self.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"bad_words: {word!r} has no tokens")
            out.append(plain)
            spaced = self.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return out

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) from its UTF-8 length alone (0 when the
        tokenizer allows no sound bound): a prompt far past the context is refused without
        tokenising it."""
        if self.bytes_per_token is None:
            return 0
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / self.bytes_per_token)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; incomplete UTF-8 at the end shows as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers`` object (read-only use: structured outputs build on it)."""
        return self._tok

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the model has none."""
        return self._templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every chat template by name ("default", "tool_use", ...)."""
        return dict(self._templates)

    @functools.cached_property
    def template_variables(self) -> frozenset[str]:
        """The variables any of the chat templates reads from its context (messages, tools,
        add_generation_prompt, a family's own such as enable_thinking or reasoning_effort)."""
        return frozenset().union(*(self._renderer.variables(t) for t in self._templates.values()))

    def variables_of(self, chat_template: str | None) -> frozenset[str]:
        """template_variables, or those of a template's source given by the caller."""
        if chat_template is None:
            return self.template_variables
        return self._renderer.variables(chat_template)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's template (or ``chat_template``, a template's
        source given by the caller), as transformers does (sandboxed).

        Template variables: messages (keys whose value is None dropped), tools, documents,
        add_generation_prompt, the special tokens (bos_token, eos_token, ...) and ``kwargs``.
        continue_final_message: the text ends where the last message's content ends (no
        end-of-turn after it), for the model to continue that message (transformers' rule).
        ``ValueError`` when there is no template, or it raises, escapes or runs too long.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt false")
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        template = chat_template if chat_template is not None else self._templates.get(name)
        if template is None:
            raise ValueError(f"{self.name} has no chat_template; give one or use a plain prompt")
        if not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of objects with a role and a content")
        # Like transformers: a key set to None (OpenAI's content=None) counts as absent.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, "documents": None, **kwargs}
        text = self._renderer.render(
            template,
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return _cut_after_final(text, messages) if continue_final_message else text

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


def _cut_after_final(text: str, messages: list[dict[str, Any]]) -> str:
    """`text` cut right after the last message's content (its last text part), where the
    template put it: the template's end-of-turn after it is dropped. transformers' rule,
    trailing whitespace included: kept where the template kept it."""
    final = messages[-1].get("content") if messages else None
    if isinstance(final, list):
        texts = [p["text"] for p in final if isinstance(p, dict) and isinstance(p.get("text"), str)]
        final = texts[-1] if texts else None
    if not isinstance(final, str) or not final.strip():
        raise ValueError("continue_final_message needs a last message with text to continue")
    at = text.rfind(final.strip())
    if at < 0:
        raise ValueError(
            "continue_final_message: the chat template does not write the last message's "
            "content as given, so there is no place to continue it from"
        )
    kept = len(final.lstrip())
    end = at + kept if text[at : at + kept] == final else at + len(final.strip())
    return text[:end]


def encode_prompt(
    tokenizer: Tokenizer | None,
    vocab_size: int,
    prompt: str | list[int],
    add_special_tokens: bool = True,
) -> list[int]:
    """Token ids of a prompt: text encoded (with the tokenizer's special tokens, BOS etc.,
    unless add_special_tokens is False), or ids checked against the model's vocabulary.
    ValueError says what is wrong."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json: send token ids")
        return tokenizer.encode(prompt, add_special_tokens)
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
    if bad:
        raise ValueError(f"prompt token ids must be integers, got {bad[0]!r}")
    out = [t for t in ids if not 0 <= t < vocab_size]
    if out:
        raise ValueError(
            f"prompt token id {out[0]} is outside the vocabulary (0..{vocab_size - 1})"
        )
    return ids


def _bytes_per_token(spec: dict[str, Any]) -> float | None:
    """The most input bytes one token can cover, from tokenizer.json, or None when nothing
    bounds it. A token covers at most its own text's UTF-8 bytes (byte-level and byte-fallback
    vocabularies spell every byte, so no token stands for more than it shows), except an
    unknown token, which may cover any run of unknown characters; normalizers may shrink the
    input before that, and some pre-tokenizers drop parts of it."""
    model = spec.get("model") or {}
    kind, vocab = model.get("type"), model.get("vocab")
    if kind == "BPE" and isinstance(vocab, dict):
        pieces: Iterable[str] = vocab
        unk = model.get("unk_token") is not None and not model.get("byte_fallback")
        if unk and model.get("fuse_unk"):
            return None
    elif kind == "Unigram" and isinstance(vocab, list):
        pieces = (entry[0] for entry in vocab)
        if model.get("unk_id") is not None and not model.get("byte_fallback"):
            return None  # Unigram fuses runs of unknown characters into one token
        unk = False
    else:
        return None  # WordPiece and WordLevel map a whole unknown word to one token
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=1)
    added = (len(t.get("content", "").encode()) for t in spec.get("added_tokens") or ())
    longest = max(longest, *added, 4 if unk else 1)  # an unfused unknown: one character
    shrink = _shrink(spec.get("normalizer"))
    if shrink is None or not _keeps_input(spec.get("pre_tokenizer")):
        return None
    return longest * shrink


def _shrink(norm: dict[str, Any] | None) -> float | None:
    """How many times shorter (in UTF-8 bytes) a normalizer can make its input, or None."""
    if norm is None:
        return 1.0
    kind = norm.get("type")
    if kind == "Sequence":
        factor = 1.0
        for member in norm.get("normalizers", ()):
            f = _shrink(member)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Prepend":
        return 1.0
    if kind == "Replace":
        pattern, content = (norm.get("pattern") or {}).get("String"), norm.get("content") or ""
        if not isinstance(pattern, str) or not content:
            return None
        return max(1.0, len(pattern.encode()) / len(content.encode()))
    if kind in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase"):
        return 4.0  # Unicode composition and case mapping shrink text by 3x at most
    return None  # Strip, BertNormalizer, Precompiled, ...: may delete characters


def _keeps_input(pre: dict[str, Any] | None) -> bool:
    """Whether a pre-tokenizer passes every input character on (Whitespace drops spaces)."""
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_keeps_input(p) for p in pre.get("pretokenizers", ()))
    if kind == "Split":
        return pre.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts")


def _token_text(value: object) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, special: dict[str, str], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None

    def segment(seq: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if add_bos else []
        parts.append(f"${seq}:{type_id}")
        return " ".join(parts + ([f"{eos}:{type_id}"] if add_eos else []))

    single = segment("A", 0)
    pair = f"{single} {segment('B', 1)}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _load_templates(path: Path, from_config: object, cfg_file: Path) -> dict[str, str]:
    """Chat templates by name; ``chat_template.jinja`` (transformers 5) wins over the config."""
    templates: dict[str, str] = {}
    if isinstance(from_config, str):
        templates["default"] = from_config
    elif isinstance(from_config, list):
        for entry in from_config:
            if not (isinstance(entry, dict) and isinstance(entry.get("template"), str)):
                raise ValueError(f"{cfg_file}: chat_template entries need name and template")
            templates[str(entry.get("name"))] = entry["template"]
    elif from_config is not None:
        raise ValueError(f"{cfg_file}: chat_template must be a string or a list")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates
