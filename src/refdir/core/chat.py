"""Chat formatting: prompts from the tokenizer's chat template, and the post-instruction tokens.

The post-instruction tokens are the template's tokens after the user's instruction (for
Qwen: ``<|im_end|>\\n<|im_start|>assistant\\n``). We find them by rendering the template around
two different sentinel instructions and taking the longest common suffix of the token ids.
Batches are left-padded, so those tokens sit at the same negative positions in every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refdir.errors import RefdirError

_SENTINELS = ("Zebra quartz velvet", "Lemon pixel harbor")


def use_left_padding(tokenizer) -> None:
    """Make ``tokenizer`` pad on the left (prompts end at the same position), with the end-of-sequence token as
    its pad token when it has none (or its first token, when it has no end-of-sequence token either)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (tokenizer.eos_token if tokenizer.eos_token is not None
                               else tokenizer.convert_ids_to_tokens(0))
    tokenizer.padding_side = "left"


@dataclass
class ChatFormat:
    tokenizer: object
    system: str | None = None
    template: str | None = None  # a plain string with "{instruction}", used when the tokenizer has none

    def __post_init__(self) -> None:
        if self.template is not None:
            if "{instruction}" not in self.template:
                raise RefdirError("--chat-template must contain the placeholder {instruction}")
        elif not getattr(self.tokenizer, "chat_template", None):
            raise RefdirError(
                "this tokenizer has no chat template; pass one with --chat-template "
                "(a string containing {instruction}, e.g. '### Instruction:\\n{instruction}\\n### Response:\\n')"
            )
        use_left_padding(self.tokenizer)
        self._post = self._find_post_instruction_ids()

    # ---------------------------------------------------------------- rendering
    def render(self, instruction: str | list[dict]) -> str:
        """The prompt for one user message, or for a conversation (``[{"role": "user" | "assistant", "content":
        ...}, ...]`` ending with a user turn: an interactive chat's history); a plain ``template`` holds one
        message, so it gets the last."""
        turns = [{"role": "user", "content": instruction}] if isinstance(instruction, str) else list(instruction)
        if self.template is not None:
            return self.template.replace("{instruction}", turns[-1]["content"])
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += turns
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError and what a template raises itself
            if type(e).__module__.split(".")[0] != "jinja2":
                raise
            why = "; drop --system or pass --chat-template" if self.system else ""
            raise RefdirError(f"the model's chat template refused the prompt: {e}{why}") from e

    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids, no special tokens added (the template carries its own)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, instruction: str) -> list[int]:
        """The rendered prompt's token ids."""
        return self.token_ids(self.render(instruction))

    def _find_post_instruction_ids(self) -> list[int]:
        a, b = (self.prompt_ids(s) for s in _SENTINELS)
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        if n == 0:
            raise RefdirError("the chat template leaves no tokens after the instruction")
        return a[len(a) - n :]

    @property
    def post_instruction_ids(self) -> list[int]:
        return list(self._post)

    @property
    def n_post(self) -> int:
        return len(self._post)

    def post_instruction_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self._post)

    # ---------------------------------------------------------------- batching
    def encode(self, instructions: list[str], device: str | torch.device = "cpu", positions: bool = False) -> dict:
        """Left-padded batch of rendered prompts, ready for the model. ``positions``: also the position ids that
        count from each row's first real token (transformers counts from the padding, which shifts the absolute
        positions of GPT-2-style learned embeddings; rotary models see the same relative positions either way)."""
        if not instructions:
            raise RefdirError("no instructions to encode (empty dataset)")
        texts = [self.render(i) for i in instructions]
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        post = torch.tensor(self._post)
        bad = (ids[:, -self.n_post :] != post).any(dim=1)
        if bad.any():
            which = [instructions[i][:60] for i in bad.nonzero().flatten().tolist()[:3]]
            raise RefdirError(
                f"the post-instruction tokens were merged into the instruction for {int(bad.sum())} "
                f"prompt(s), e.g. {which}; use a chat template that separates them"
            )
        if positions:
            enc["position_ids"] = (enc["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        return {k: v.to(device) for k, v in enc.items()}
