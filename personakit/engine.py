"""The one decoding engine: prompts as token ids, each row with its own adapter, token limit and
sampling, decoded as one KV-cached batch that rows join and leave.

chat.py's reply, `generation.generate_replies` (reports, replay rows) and the server's scheduler
all decode here. A batch is left-padded to one length; a row's prompt may start with a cached
prefix (its persona's system prompt under the template, prefilled once); each step feeds every
row its last token; a row leaves, KV cache included, as soon as its reply ends, and the cache
columns that no row attends to any more are dropped. Rows of different personas share a batch
through personakit/mixed_lora.py where the adapters allow it, else a batch holds one persona.
Repetition controls look at each row's own reply (scope "all": its prompt and reply).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import UserError
from .loading import use_adapter
from .mixed_lora import MixedLora, lora_layers
from .template import stop_token_ids

PREFIXES = 16  # prompt starts (per adapter) whose KV cache is kept
AS_IS, PER_BATCH, PER_ROW = "as-is", "per-batch", "per-row"  # adapter routing, see `Engine`


@dataclass(frozen=True)
class Sampling:
    """How a row picks each token: greedy, or sampled with transformers' warpers from its own seeded
    generator, so that the rows it shares a batch with never change its reply."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    # OpenAI's: each token's logit lowers by presence_penalty once it is in the reply, plus frequency_penalty per use
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(eq=False)
class Row:
    """One prompt being answered: what it asks for, and its reply tokens so far."""

    prompt: list[int]
    max_tokens: int
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    shared: int = 0  # leading prompt tokens whose KV cache is kept and reused (a persona's system prompt)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (end of turn, or a stop string) or "length"
    generator: Any = None

    def update(self, decode: Callable[[list[int]], str]) -> None:
        """Called after every token the row takes; may set `finish` (a stop string)."""

    def abandoned(self) -> bool:
        """True drops the row at once, without an end (its client went away, Ctrl-C)."""
        return False


@dataclass(eq=False)
class TextRow(Row):
    """A row whose reply text goes out piece by piece (`on_text`) as it grows; a stop string ends it."""

    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    sent: str = ""

    def visible(self, decode: Callable[[list[int]], str], final: bool) -> tuple[str, bool]:
        """The reply text that may go out now, and whether a stop string ended it.

        The whole reply is stripped; until the end, trailing whitespace, a broken multi-byte
        character and the start of a possible stop string are held back, so that the pieces
        always add up to the final text.
        """
        text = decode(self.tokens).lstrip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            return text[:min(cuts)].rstrip(), True
        if final:
            return text.rstrip(), False
        text = text.rstrip().rstrip("\ufffd").rstrip()
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold], False

    def update(self, decode: Callable[[list[int]], str]) -> None:
        text, stopped = self.visible(decode, final=self.finish is not None)
        if stopped:
            self.finish = "stop"
        if text.startswith(self.sent) and len(text) > len(self.sent):
            if self.on_text is not None:
                self.on_text(text[len(self.sent):])
            self.sent = text


@dataclass
class Batch:
    """Rows decoded together: their KV cache (left-padded to one length), the attention mask over
    the cache plus the token each row feeds next, and those tokens."""

    rows: list[Row]
    cache: Any
    mask: Any  # (rows, cache length + 1)
    step_ids: Any = None  # (rows, 1)


def joinable(cache: Any) -> bool:
    """Whether rows can join (or be copied from) this cache: plain per-layer key/value tensors, what
    decoder-only chat models use; any other cache kind (sliding window, static, quantized) stays closed."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.keys is not None for layer in getattr(cache, "layers", [None]))


def _left_pad(t: Any, n: int, dim: int) -> Any:
    import torch

    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(batch: Batch, new: Batch) -> Batch:
    """One batch holding the rows of both: caches and masks left-padded to the longer one, rows stacked."""
    import torch

    width = max(batch.mask.shape[1], new.mask.shape[1])
    pads = (width - batch.mask.shape[1], width - new.mask.shape[1])
    for mine, theirs in zip(batch.cache.layers, new.cache.layers):
        mine.keys = torch.cat([_left_pad(mine.keys, pads[0], 2), _left_pad(theirs.keys, pads[1], 2)])
        mine.values = torch.cat([_left_pad(mine.values, pads[0], 2), _left_pad(theirs.values, pads[1], 2)])
    batch.mask = torch.cat([_left_pad(batch.mask, pads[0], 1), _left_pad(new.mask, pads[1], 1)])
    batch.step_ids = torch.cat([batch.step_ids, new.step_ids])
    batch.rows = batch.rows + new.rows
    return batch


def _trim(batch: Batch) -> None:
    """Drop the leading cache columns that no remaining row attends to (padding of rows that left)."""
    first = int(batch.mask.any(0).int().argmax())
    if first > 0 and joinable(batch.cache):
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        batch.mask = batch.mask[:, first:]


class Adapters:
    """Which adapter the rows of a forward pass use. "per-row": each row its own (mixed_lora.py),
    where every adapter is plain LoRA, else falls back to "per-batch": one adapter for the whole
    pass, switched only when it changes; "as-is": the model as the caller left it."""

    def __init__(self, model: Any, routing: str):
        self.model, self.routing = model, routing
        self.mixed = MixedLora.for_model(model) if routing == PER_ROW else None
        if routing == PER_ROW and self.mixed is None:
            self.routing = PER_BATCH
        self.layers = lora_layers(model) if self.routing == PER_BATCH else []
        self.active: str | None = None  # the adapter the LoRA layers use now

    def key(self, adapter: str | None) -> str | None:
        """Rows with the same key may share a batch."""
        return adapter if self.routing == PER_BATCH else "*"

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None]) -> Iterator[Any]:
        """The model with row i of the next forward passes on adapter `adapters[i]`.

        Per batch, the LoRA layers are listed once and switched by hand: PeftModel's `set_adapter`
        walks every module each time, and batches of different personas take turns every step."""
        if self.routing == AS_IS:
            yield self.model
            return
        if self.mixed is not None:
            with self.mixed.rows(adapters) as model:
                yield model
            return
        adapter = adapters[0]
        if adapter is None or not self.layers:
            with use_adapter(self.model, adapter) as model:
                yield model
            return
        if adapter != self.active:
            if adapter not in self.model.peft_config:
                raise UserError(f"persona {adapter} is not loaded; loaded: {', '.join(self.model.peft_config)}")
            for layer in self.layers:
                layer.set_adapter(adapter, inference_mode=True)
            self.model.base_model.active_adapter = adapter
            self.active = adapter
        yield self.model


class Engine:
    """Decodes rows on one model: `add` prefills rows into a batch (new or running), `step` runs one
    decoding step of a batch, `run` decodes rows to their end. Not thread-safe: one thread drives it."""

    def __init__(self, model: Any, tokenizer: Any, *, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 repetition_scope: str = "reply", routing: str = AS_IS, tokenizer_lock: Any = None):
        from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        self.model, self.tokenizer = model, tokenizer
        self.lock = tokenizer_lock or threading.Lock()  # the tokenizer is shared with request threads
        self.stops = set(stop_token_ids(tokenizer))
        self.scope = repetition_scope
        self.processors = [p for p in (
            RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None,
            NoRepeatNGramLogitsProcessor(no_repeat_ngram_size) if no_repeat_ngram_size else None) if p is not None]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        self.adapters = Adapters(model, routing)
        self.prefixes: OrderedDict[tuple, Any] = OrderedDict()  # (adapter, prompt start) -> its KV cache, most recent last
        self.rows_per_step: Counter[int] = Counter()  # decoding steps run with each batch size

    def decode(self, tokens: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def run(self, rows: list[Row]) -> list[Row]:
        """Decode `rows` as one batch until every one has ended or been abandoned."""
        batch = self.add(None, rows)
        while batch is not None:
            batch = self.step(batch)
        return rows

    def add(self, batch: Batch | None, rows: list[Row], failed: Callable[[list[Row]], None] | None = None) -> Batch | None:
        """`rows` prefilled (in groups of one adapter and one cached prompt start), their first token
        taken, and joined to `batch` (None: a new one). A group whose prefill raises goes to
        `failed` where given. None when no row is left running."""
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault((row.adapter, tuple(row.prompt[:row.shared])), []).append(row)
        for group in groups.values():
            try:
                new = self._prefill(group)
            except Exception:
                if failed is None:
                    raise
                failed(group)
                continue
            if new is not None:
                batch = new if batch is None else join(batch, new)
        return batch

    def _prefill(self, rows: list[Row]) -> Batch | None:
        """The prompts of `rows` as one left-padded batch after their start's cached KV."""
        import torch

        device = next(self.model.parameters()).device
        for row in rows:
            if row.sampling.do_sample:
                row.generator = torch.Generator(device=device).manual_seed(row.sampling.seed)
        start = rows[0].prompt[:rows[0].shared]
        cache = self._prefix_cache(rows[0].adapter, start, len(rows)) if start else None
        if cache is None:
            start = []
        rest = [r.prompt[len(start):] for r in rows]
        width = max(len(r) for r in rest)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=device)
        mask = torch.tensor([[1] * len(start) + [0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, len(start):]
        with torch.no_grad(), self.adapters.rows([r.adapter for r in rows]) as model:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **self.extra)
        return self._take(Batch(rows, out.cache, mask), out.logits[:, -1])

    def _prefix_cache(self, adapter: str | None, start: list[int], rows: int) -> Any:
        """A copy, for `rows` rows, of the KV cache of the prompt start `start` under `adapter`
        (computed once, the last PREFIXES kept); None where the cache kind cannot be copied this way."""
        import torch

        name = (adapter, tuple(start))
        if name not in self.prefixes:
            device = next(self.model.parameters()).device
            ids = torch.tensor([start], device=device)
            with torch.no_grad(), self.adapters.rows([adapter]) as model:
                self.prefixes[name] = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **self.extra).cache
            while len(self.prefixes) > PREFIXES:
                self.prefixes.popitem(last=False)
        self.prefixes.move_to_end(name)
        cached = self.prefixes[name]
        if not joinable(cached):
            return None
        cache = copy.deepcopy(cached)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def step(self, batch: Batch) -> Batch | None:
        """One decoding step of every row in `batch`; None once no row is left."""
        import torch

        self.rows_per_step[len(batch.rows)] += 1
        positions = batch.mask.long().sum(-1, keepdim=True) - 1
        with torch.no_grad(), self.adapters.rows([r.adapter for r in batch.rows]) as model:
            out = model(input_ids=batch.step_ids, attention_mask=batch.mask, position_ids=positions, cache=batch.cache,
                        use_cache=True, **self.extra)
        batch.cache = out.cache
        return self._take(batch, out.logits[:, -1])

    def _take(self, batch: Batch, logits: Any) -> Batch | None:
        """Each row's next token from `logits`; the rows that ended leave. None once none is left."""
        import torch

        scores = logits.to(dtype=torch.float32)
        chosen = [self._pick(r, scores[i:i + 1]) for i, r in enumerate(batch.rows)]
        keep = [i for i, (r, t) in enumerate(zip(batch.rows, chosen)) if not self._advance(r, t) and not r.abandoned()]
        if not keep:
            return None
        step_ids = torch.tensor(chosen, device=scores.device)[:, None]
        if len(keep) < len(batch.rows):
            kept = torch.tensor(keep, device=scores.device)
            batch.cache.batch_select_indices(kept)
            batch.mask, step_ids = batch.mask[kept], step_ids[kept]
            batch.rows = [batch.rows[i] for i in keep]
            _trim(batch)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        batch.step_ids = step_ids
        return batch

    def _pick(self, row: Row, scores: Any) -> int:
        """The next token of one row: repetition controls, then greedy or the row's own sampling."""
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        seen = row.prompt + row.tokens if self.scope == "all" else row.tokens
        ids = torch.tensor([seen], dtype=torch.long, device=scores.device)
        if seen:
            for processor in self.processors:
                scores = processor(ids, scores)
        s = row.sampling
        if row.tokens and (s.presence_penalty or s.frequency_penalty):  # the reply's own tokens, like the scope "reply"
            counts = torch.bincount(torch.tensor(row.tokens, device=scores.device), minlength=scores.shape[-1])[:scores.shape[-1]]
            scores = scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
        if not s.do_sample:
            return int(scores.argmax(dim=-1))
        # transformers' own warpers in generate's order, on this row alone, so its own seed decides
        for warper in (TemperatureLogitsWarper(s.temperature), TopKLogitsWarper(s.top_k) if s.top_k else None,
                       TopPLogitsWarper(s.top_p) if s.top_p < 1 else None):
            if warper is not None:
                scores = warper(ids, scores)
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=row.generator))

    def _advance(self, row: Row, token: int) -> bool:
        """Take one new token for `row`; True once its reply is over."""
        if token in self.stops:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if len(row.tokens) >= row.max_tokens:
                row.finish = "length"
        row.update(self.decode)
        return row.finish is not None
