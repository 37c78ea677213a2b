"""Chat with the base, LoRA and fused models in the terminal, answers streamed as generated.

    python -m voicetune.tools.chat                      # the fine-tuned model (base + adapters)
    python -m voicetune.tools.chat --model base         # base | lora | fused | dpo
    python -m voicetune.tools.chat --compare base,lora  # every message answered by each model
    python -m voicetune.tools.chat --system "You are ..." --max-tokens 400 --temperature 0.7

The persona is params.yaml's data.system_prompt; decoding follows eval.* (max_tokens,
temperature, seed, repetition_penalty), through the evaluate stage's own generation function:
a greedy chat answer to a test question is the evaluate stage's prediction for it.
In the chat: /help lists the commands; Ctrl-C stops an answer, Ctrl-D quits.

/rewrite puts a draft into the author's voice (the rewrite task, ``voicetune.data.rewrite``):
the draft follows on the same line, or is pasted over several lines ended by a line holding
only "." (or Ctrl-D). Every active model rewrites it as a standalone single turn, [persona,
"Rewrite this in my voice:" + the draft], exactly the training and evaluation format, so a
greedy rewrite is the evaluate stage's; it neither reads nor enters the chat histories. Its
length limit is eval.rewrite_max_tokens (--rewrite-max-tokens); --max-tokens and /max are the
answers' limit only; the temperature (/temp) applies to both.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

from voicetune.core.errors import UserError, run_stage
from voicetune.core.params import load_params
from voicetune.data import rewrite
from voicetune.models.loader import ChatModels
from voicetune.models.registry import NAMES
from voicetune.serve.chat import Settings, parse_models, stream_answer

HELP = f"""commands:
  /model NAME[,NAME...]  answer with one model, or several in turn ({', '.join(NAMES)})
  /reset                 forget the conversation (every model's history)
  /max [N]               show or set the answer length limit in tokens
  /temp [T]              show or set the temperature (0 = greedy; > 0 samples, seeded)
  /rewrite [TEXT]        TEXT in the author's voice; without TEXT, paste a draft of any
                         number of lines, ended by a line holding only "." (or Ctrl-D).
                         A standalone turn, outside the conversation; its length limit is
                         eval.rewrite_max_tokens (--rewrite-max-tokens), not /max
  /system                show the persona prompt
  /help                  this list
  /quit                  leave (or Ctrl-D)
Ctrl-C stops an answer (that exchange is then forgotten) or a rewrite. Each model keeps its
own history."""

DRAFT_PROMPT = '[paste the draft; end it with a line holding only "." (or Ctrl-D)]'


@dataclass
class Chat:
    """The conversation state: which models answer, their histories, the settings."""
    models: ChatModels
    system: str
    settings: Settings
    active: list[str]
    out: object = sys.stdout
    histories: dict = field(default_factory=lambda: {name: [] for name in NAMES})
    rewrite_max_tokens: int | None = None  # a rewrite's length limit; None: the answers' (/max)
    read: Callable[[str], str] = input     # one line from the user, after a prompt

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def ask(self, question: str) -> dict[str, dict]:
        """Every active model answers in turn, under its heading. Ctrl-C (KeyboardInterrupt)
        stops the answer being streamed and drops this whole exchange from every history: a
        cut-off answer would be shown to the model as its own in every later prompt, and a
        question without an answer breaks the user/assistant alternation some templates demand.
        Every answer re-reads the whole history (no cache kept between turns): simple, and the
        very prompt the evaluate stage would build for the same conversation."""
        answers = {}
        try:
            for name in self.active:
                model, tokenizer = self.models.get(name)
                self.write(f"[{name}]\n")
                messages = [{"role": "system", "content": self.system}, *self.histories[name],
                            {"role": "user", "content": question}]
                answers[name] = stream_answer(model, tokenizer, messages, self.settings, self.write)
                cut = " [hit the limit: /max to raise it]" if answers[name]["finish_reason"] == "length" else ""
                self.write(f"{cut}\n\n")
        except KeyboardInterrupt:
            self.write("\n[stopped: this exchange is forgotten]\n\n")
            return {}
        for name, answer in answers.items():
            self.histories[name] += [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer["prediction"]}]
        return answers

    def rewrite(self, draft: str) -> dict[str, dict]:
        """Every active model rewrites ``draft`` in the author's voice, streamed under its
        heading like an answer. A rewrite is not part of the conversation: its prompt is the
        rewrite task's standalone turn, [persona, instruction + draft], exactly as in training
        and evaluation, without any history, and nothing of it enters the histories. Ctrl-C
        stops it; the session goes on."""
        draft = draft.strip()
        if not draft:
            self.write("[empty draft: nothing to rewrite]\n")
            return {}
        limit = self.rewrite_max_tokens or self.settings.max_tokens
        settings = dataclasses.replace(self.settings, max_tokens=limit)
        conversation = rewrite.messages(self.system, draft)  # no history, on purpose
        rewrites = {}
        try:
            for name in self.active:
                model, tokenizer = self.models.get(name)
                self.write(f"[{name}]\n")
                rewrites[name] = stream_answer(model, tokenizer, conversation, settings, self.write)
                cut = (f" [hit the rewrite limit of {limit} tokens: --rewrite-max-tokens to raise it]"
                       if rewrites[name]["finish_reason"] == "length" else "")
                self.write(f"{cut}\n\n")
        except KeyboardInterrupt:
            self.write("\n[stopped]\n\n")
            return {}
        return rewrites

    def read_draft(self) -> str | None:
        """A pasted draft: lines up to one holding only "." or Ctrl-D (EOF); None when Ctrl-C
        cancels it."""
        self.write(DRAFT_PROMPT + "\n")
        lines = []
        while True:
            try:
                line = self.read("")
            except EOFError:
                self.write("\n")
                break
            except KeyboardInterrupt:
                self.write("\n[rewrite cancelled]\n")
                return None
            if line.strip() == ".":
                break
            lines.append(line)
        return "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run an in-chat command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.write(HELP + "\n")
        elif name == "reset":
            self.histories = {n: [] for n in NAMES}
            self.write("[history cleared]\n")
        elif name == "model":
            if arg:
                names = parse_models(arg)
                self.models.prepare(names)
                self.active = names
            self.write(f"[answering: {', '.join(self.active)}]\n")
        elif name == "max":
            if arg:
                if not arg.isdigit() or int(arg) < 1:
                    raise UserError(f"/max {arg}: give a whole number of tokens >= 1")
                self.settings.max_tokens = int(arg)
            self.write(f"[max tokens: {self.settings.max_tokens}]\n")
        elif name == "temp":
            if arg:
                try:
                    value = float(arg)
                except ValueError:
                    value = -1.0
                if not value >= 0:
                    raise UserError(f"/temp {arg}: give a number >= 0 (0 = greedy)")
                self.settings.temperature = value
            t = self.settings.temperature
            self.write(f"[temperature: {t}{' (greedy)' if t == 0 else f', seed {self.settings.seed}'}]\n")
        elif name == "rewrite":
            draft = arg if arg else self.read_draft()
            if draft is not None:
                self.rewrite(draft)
        elif name == "system":
            self.write(self.system + "\n")
        else:
            raise UserError(f"unknown command {line.split()[0]}: /help lists them")
        return True

    def run(self, read=None) -> None:
        """The read-answer loop until /quit or Ctrl-D (EOF); Ctrl-C at the prompt clears the line."""
        if read is not None:
            self.read = read
        while True:
            try:
                line = self.read("you> ").strip()
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n(Ctrl-D or /quit to leave)\n")
                continue
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.ask(line)
            except UserError as err:  # a mistyped command or a missing model ends nothing
                self.write(f"{err}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", choices=NAMES, default="lora")
    which.add_argument("--compare", metavar="base,lora[,fused]",
                       help="answer every message with each of these models in turn")
    ap.add_argument("--system", help="persona prompt (default: params.yaml data.system_prompt)")
    ap.add_argument("--max-tokens", type=int, help="answer length limit (default: eval.max_tokens)")
    ap.add_argument("--rewrite-max-tokens", type=int,
                    help="/rewrite's length limit (default: eval.rewrite_max_tokens)")
    ap.add_argument("--temperature", type=float, help="0 = greedy (default: eval.temperature)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--adapters", default="models/adapters")
    ap.add_argument("--fused", default="models/fused")
    ap.add_argument("--preference-adapters", default="models/preference_adapters",
                    help="the preference stage's adapters, on the fused model: dpo")
    ap.add_argument("--no-check", action="store_true",
                    help="skip asking DVC whether the models are current (faster start)")
    args = ap.parse_args(argv)
    if args.rewrite_max_tokens is not None and args.rewrite_max_tokens < 1:
        ap.error("--rewrite-max-tokens: give a whole number of tokens >= 1")
    params = load_params(args.params)
    settings = Settings.from_params(params, args.max_tokens, args.temperature)
    active = parse_models(args.compare) if args.compare else [args.model]
    models = ChatModels(args.base, args.adapters, args.fused, check=not args.no_check,
                        preference_adapters=args.preference_adapters,
                        fast_cpu=params["kernels"]["fast_cpu"])
    models.prepare(active)  # a missing or stale model stops here, before the first question
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"chatting with {', '.join(active)}; /help for commands, Ctrl-D to quit")
    rewrite_max_tokens = (params["eval"]["rewrite_max_tokens"] if args.rewrite_max_tokens is None
                          else args.rewrite_max_tokens)
    Chat(models, args.system or params["data"]["system_prompt"], settings, active,
         rewrite_max_tokens=rewrite_max_tokens).run()
    return 0


if __name__ == "__main__":
    try:
        run_stage("chat", main)
    except KeyboardInterrupt:  # Ctrl-C while loading: leave quietly
        sys.exit(130)
