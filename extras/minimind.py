"""MiniMind's chat template: ChatML with a think block opening every assistant turn,
`<think>\n{reasoning}\n</think>\n\n`, empty when there is no reasoning; the generation
prompt ends with the empty block. The block is prompt (mask 0) when empty and response
(mask 1) when it holds reasoning. data.Chat(enc) is a MiniMindChat for a tokenizer that
names this template (tools/convert.py's conversion of MiniMind's tokenizer does).
"""

from data import Chat
from errors import UserError
from tokenizer import encode_text

THINK, END_THINK = "<think>", "</think>"


class MiniMindChat(Chat):
    def think_block(self, reasoning):
        """`<think>\n{reasoning}\n</think>\n\n` as ids."""
        # MiniMind's tokenizer encodes "\n\n" + content as one piece; its vocabulary has no
        # "\n\n" token, so encoding the two apart gives the same ids (tests check).
        return ([self.enc.encode_single_token(THINK)] + encode_text(self.enc, f"\n{reasoning}\n")
                + [self.enc.encode_single_token(END_THINK)] + encode_text(self.enc, "\n\n"))

    def split_reasoning(self, content):
        """(reasoning, answer) of an assistant message, as MiniMind's template splits it:
        the text before `</think>` (less a leading `<think>`) and the text after it."""
        if END_THINK not in content:
            return "", content
        parts = content.split(END_THINK)
        return parts[0].split(THINK)[-1].strip("\n"), parts[-1].lstrip("\n")

    def assistant_prefix(self, content):
        reasoning, content = self.split_reasoning(content)
        think = self.think_block(reasoning)
        return think, [1 if reasoning else 0] * len(think), content  # trained on if not empty

    def generation_prompt(self):
        return super().generation_prompt() + self.think_block("")

    def render_response(self, messages):
        reasoning, content = self.split_reasoning(messages[0]["content"])
        if reasoning:
            raise UserError("a response with <think> reasoning: the MiniMind prompt ends "
                            "with an empty think block, so DPO cannot score reasoning")
        return super().render_response([{**messages[0], "content": content}, *messages[1:]])
