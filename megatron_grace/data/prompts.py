"""The GRACE prompt: chat-template rendering, the pooling start (L_sys) and template-preserving truncation.

Training (rollouts, pooled embeddings) and the inference-time encoder both build prompts here, so the embedding a
trained model produces at evaluation time is pooled over exactly the tokens it was trained on.

The pooling mask starts at the first token of the user text: BOS, the system header, the system prompt and the user
header are excluded (L_sys tokens). L_sys is found per tokenizer by locating the user text in the rendered template
through the tokenizer's character offsets; a template in which the text cannot be found is an error, never a silent 0.
"""
from __future__ import annotations

from dataclasses import dataclass

SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within <think></think> tags. "
    "Finally, generate a comprehensive understanding of this text."
)


class PromptError(ValueError):
    """A text that cannot be rendered as a GRACE prompt (template without the text, or no room left for it)."""


@dataclass(frozen=True)
class Prompt:
    """A tokenised GRACE prompt.

    ``pool_start`` is L_sys: the index of the first token that belongs to the user text. Every token from there on
    (user text, template tail and, once generated, the rationale) is pooled into the embedding.
    """

    input_ids: list[int]
    pool_start: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Renders texts with the tokenizer's chat template and the GRACE system prompt."""

    def __init__(self, tokenizer, system_prompt: str = SYSTEM_PROMPT):
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
        if not getattr(tokenizer, "is_fast", False):
            raise PromptError("a fast tokenizer (character offsets) is needed to locate the user text")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def render_text(self, text: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _split(self, text: str) -> tuple[list[int], int, int]:
        """Token ids of the rendered prompt and the token span [start, end) of the user text."""
        rendered = self.render_text(text)
        # Search after the system prompt so a user text that also occurs inside it is not matched there.
        sys_at = rendered.find(self.system_prompt)
        search_from = sys_at + len(self.system_prompt) if sys_at >= 0 else 0
        # Some templates (Llama 3) trim the message content: then the stripped text is what appears.
        located = text if text in rendered[search_from:] else text.strip()
        char_start = rendered.find(located, search_from)
        if char_start < 0 or not located:
            raise PromptError(
                f"cannot locate the user text in the chat template of {self.tokenizer.name_or_path!r} "
                f"(text starts {text[:40]!r}); L_sys would be unknown"
            )
        char_end = char_start + len(located)
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        # A token that straddles the start of the text (a merge with the header's newline) counts as text.
        start = sum(1 for _, tok_end in offsets if tok_end <= char_start)
        end = sum(1 for tok_start, _ in offsets if tok_start < char_end)
        return ids, start, end

    def build(self, text: str, max_length: int | None = None, truncate: bool = False) -> Prompt:
        """Tokenise ``text`` as a GRACE prompt.

        Over ``max_length`` tokens: with ``truncate`` the user text is cut from the right and the template tail (end of
        turn, assistant header) is kept; without it a :class:`PromptError` is raised so the caller can skip and count.
        """
        ids, start, end = self._split(text)
        if max_length is None or len(ids) <= max_length:
            return Prompt(ids, start)
        if not truncate:
            raise PromptError(f"prompt has {len(ids)} tokens, more than the maximum of {max_length}")
        keep_text = max_length - (len(ids) - (end - start))
        if keep_text < 1:
            raise PromptError(f"max length {max_length} leaves no room for the text after the chat template")
        return Prompt(ids[: start + keep_text] + ids[end:], start, truncated=True)
