"""Text of a decoding as it grows: incremental detokenization and stop sequences, in one place.

The decode loop owns one `TextStream` per request: every step's kept tokens become a text delta
(the `Emitted` event carries it), and a stop sequence ends decoding at the step whose text
completes it. The HTTP front end forwards those deltas and never detokenizes again.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Text deltas from a growing token list, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if not final and text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta


class StopMatcher:
    """Stop sequences over a growing text: what may be sent, holding back a tail that could still
    begin a stop sequence, and where the first stop sequence starts."""

    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop  # the text ends after the stop sequence instead of before it
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.hit = False

    def push(self, delta: str, final: bool = False) -> str:
        """Add text; returns the text now safe to send (all of it up to a stop when one is hit)."""
        if self.hit:
            return ""
        self.text += delta
        at = first_stop(self.text, self.stops, max(0, self.sent - self.keep))
        if at is not None:
            self.hit = True
            end = at + (max(len(x) for x in self.stops if self.text.startswith(x, at)) if self.include_stop else 0)
        elif final or not self.stops:
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self._pending())
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _pending(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop sequence."""
        for n in range(min(self.keep, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


def first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


class TextStream:
    """One request's text: `push(token ids)` returns the delta that may be sent now (held back while
    it could still begin a stop sequence or ends inside a UTF-8 sequence); `hit` is set once a stop
    sequence appears, and the text stops before it; `finish()` flushes what was held back."""

    def __init__(self, tokenizer, stops=(), include_stop: bool = False, skip_special_tokens: bool = True):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = StopMatcher(list(stops), include_stop)

    @property
    def hit(self) -> bool:
        return self._stop.hit

    def push(self, ids: list[int]) -> str:
        return self._stop.push(self._detok.push(list(ids)))

    def finish(self) -> str:
        return self._stop.push(self._detok.push([], final=True), final=True)
