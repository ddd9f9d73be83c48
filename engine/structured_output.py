"""Structured outputs: a request's output held to a JSON schema, any JSON object, a regex, a list
of choices or an EBNF grammar, by masking the logits of every token the grammar cannot take next.

Built on xgrammar (chosen over llguidance by bench/grammar_mask.py, see the README): a grammar is
compiled once against the tokenizer's vocabulary (its token masks precomputed, which makes each
step's mask cheap), compiled grammars are kept in an LRU keyed by the spec's text, and each
request holds a matcher that advances with every token it accepts. Compilation runs on a worker
thread, so a slow schema holds back only its own request, never the other requests' steps (the
engine admits the request to the scheduler once its grammar is ready, as vLLM does). EOS is
allowed only where the grammar may end; hitting max_tokens is the only way to an unfinished
output (finish_reason "length").

Legend: B rows (sequences that sample this step), V vocabulary (the model's logits), W = ceil(V/32)
int32 words of a packed token bitmask (bit j of word w: token 32 * w + j is allowed)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

# the spec (engine/structured_spec.py) is re-exported: callers hand it to this module's manager
from engine.structured_spec import (
    StructuredOutputError,
    StructuredOutputsParams,
    clean_error,
    grammar_of,
    json_ebnf,
)

if TYPE_CHECKING:  # xgrammar is imported when first needed: it pulls in transformers (~1 s)
    import xgrammar

    from engine.tokenizer import Tokenizer

__all__ = ["GrammarState", "StructuredOutputError", "StructuredOutputManager", "StructuredOutputsParams",
           "TokenMask", "apply_token_mask", "grammar_of", "json_ebnf"]

GRAMMAR_CACHE_SIZE = 128  # compiled grammars kept (LRU); a JSON schema's is tens of KiB to MiBs


# -- per-request state ---------------------------------------------------------------------------
_UTF8_BAD_NEXT = {0xE0: range(0x80, 0xA0), 0xED: range(0xA0, 0xC0), 0xF0: range(0x80, 0x90),
                  0xF4: range(0x90, 0xC0)}  # lead byte → the bytes that may not follow it


class Utf8Guard:
    """What xgrammar 0.2.8's byte automaton lets through and UTF-8 forbids: the byte after a lead
    E0 / ED / F0 / F4 must be in A0-BF / 80-9F / 90-BF / 80-8F (no overlong forms, no surrogates,
    nothing past U+10FFFF), which it does not check in every rule (E0 80 80 passes a pattern, ED A0
    80 a plain string). Such bytes decode to U+FFFD, which breaks a maxLength. So: tokens with such
    a pair inside are never allowed, and after a token that ends with one of these leads, tokens
    starting with a byte the lead cannot take are masked too."""

    def __init__(self, token_bytes: Sequence[bytes], num_words: int) -> None:
        def packed(ids: list[int]) -> Tensor:
            allowed = torch.full((num_words,), -1, dtype=torch.int32)
            for t in ids:
                allowed[t // 32] &= ~_bit(t % 32)
            return allowed

        bad_inside, after = [], {lead: [] for lead in _UTF8_BAD_NEXT}
        self.ends_with_lead: dict[int, int] = {}
        for t, b in enumerate(token_bytes):
            if not b:
                continue
            if any(b[i] in _UTF8_BAD_NEXT and b[i + 1] in _UTF8_BAD_NEXT[b[i]] for i in range(len(b) - 1)):
                bad_inside.append(t)
            for lead, bad in _UTF8_BAD_NEXT.items():
                if b[0] in bad:
                    after[lead].append(t)
            if b[-1] in _UTF8_BAD_NEXT:
                self.ends_with_lead[t] = b[-1]
        self.always = packed(bad_inside) if bad_inside else None  # [W] allowed bits
        self.after = {lead: packed(ids) for lead, ids in after.items()}


class GrammarState:
    """One request's position in its grammar: advanced by each token it accepts."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, stop_token_ids: frozenset[int],
                 utf8: Utf8Guard | None = None) -> None:
        self.matcher = matcher
        self.stop_token_ids = stop_token_ids
        self.utf8 = utf8
        self.lead: int | None = None  # the UTF-8 lead byte the output ends with, if constrained

    @property
    def terminated(self) -> bool:
        """The grammar ended and took a stop token: only stop tokens may follow (with
        ignore_eos, a request goes on to max_tokens with stop tokens)."""
        return self.matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        if self.terminated:
            return token_id in self.stop_token_ids
        if self.utf8 is not None:
            self.lead = self.utf8.ends_with_lead.get(token_id)
        return self.matcher.accept_token(token_id)

    def fill(self, bitmask: Tensor, row: int) -> None:
        if self.terminated:
            bitmask[row] = 0
            for t in self.stop_token_ids:
                if t < bitmask.shape[1] * 32:
                    bitmask[row, t // 32] |= _bit(t % 32)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.utf8 is not None:
            if self.utf8.always is not None:
                bitmask[row] &= self.utf8.always
            if self.lead is not None:
                plain = bitmask[row].clone()
                bitmask[row] &= self.utf8.after[self.lead]
                if not bool(bitmask[row].any()):  # the grammar takes nothing else: let it have its way
                    bitmask[row] = plain


def _bit(j: int) -> int:
    """Bit j of an int32 word, as the signed value torch stores."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


# -- the engine's side ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenMask:
    """The step's grammar masks: `bitmask` [len(rows), W] int32 for the sampler's rows `rows`;
    the other rows are not masked."""

    rows: tuple[int, ...]
    bitmask: Tensor


class StructuredOutputManager:
    """Compiles grammars (on a worker thread, cached) and builds each step's token masks. One per
    engine; the xgrammar tokenizer info is built on first use (for a 151k vocabulary it takes
    ~0.4 s), on the worker thread too."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        """`vocab_size`: the model's logits columns (ids past the tokenizer's are never allowed);
        `stop_token_ids`: the EOS tokens, allowed only where the grammar may end."""
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self._lock = threading.Lock()  # the cache: the worker writes, the engine thread reads
        self._compiler: Any = None
        self._utf8: Utf8Guard | None = None  # made with the compiler, from its token table
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextserve-grammar")
        self._bitmask: Tensor | None = None  # [rows, W], grown as batches need
        self._inflight: dict[tuple[str, str, bool], Future] = {}
        self.num_compiled = 0  # grammars compiled (cache misses), for tests and metrics

    @property
    def num_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def cached(self, params: StructuredOutputsParams) -> Any | None:
        """The compiled grammar if the cache has it (cheap: the engine asks on add_request)."""
        with self._lock:
            compiled = self._cache.get(params.key)
            if compiled is not None:
                self._cache.move_to_end(params.key)
            return compiled

    def submit(self, params: StructuredOutputsParams) -> Future:
        """Compile on the worker thread; the future's result is the compiled grammar, or it
        raises StructuredOutputError. Requests with the same spec share one compile (e.g. the
        prompts of one completions request)."""
        with self._lock:
            future = self._inflight.get(params.key)
            if future is None or future.done():
                future = self._inflight[params.key] = self._pool.submit(self._compile_once, params)
            return future

    def _compile_once(self, params: StructuredOutputsParams) -> Any:
        try:
            return self.compile(params)
        finally:
            with self._lock:
                self._inflight.pop(params.key, None)

    def compile(self, params: StructuredOutputsParams) -> Any:
        compiled = self.cached(params)
        if compiled is not None:
            return compiled
        grammar = grammar_of(params)
        try:
            compiled = self._get_compiler().compile_grammar(grammar)
        except Exception as e:
            raise StructuredOutputError(params.kind, f"invalid {params.kind}: {clean_error(e)}") from None
        with self._lock:
            self.num_compiled += 1
            self._cache[params.key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, compiled: Any) -> GrammarState:
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(self.stop_token_ids)),
                            self.stop_token_ids, self._utf8)

    def masks(self, states: Sequence[GrammarState | None]) -> tuple[TokenMask | None, dict[int, Exception]]:
        """The step's TokenMask for the rows whose request has a grammar (None if none has),
        and the rows whose mask could not be built (they fail alone)."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return None, {}
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = torch.empty(max(len(rows), 16), self.num_words, dtype=torch.int32)
        bitmask = self._bitmask[:len(rows)]
        failed: dict[int, Exception] = {}
        for j, i in enumerate(rows):
            try:
                states[i].fill(bitmask, j)  # type: ignore[union-attr]
            except Exception as e:
                failed[i] = e
                bitmask[j] = -1
        # A grammar with no way on (an empty language: {"anyOf": []}) would leave every logit
        # -inf: its request fails alone instead of sampling garbage.
        for j in (~bitmask.any(1)).nonzero().flatten().tolist():
            failed[rows[j]] = ValueError("the grammar allows no token here: the schema or grammar "
                                         "has no valid continuation")
            bitmask[j] = -1
        return TokenMask(rows=tuple(rows), bitmask=bitmask.clone()), failed

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _get_compiler(self) -> Any:
        if self._compiler is None:  # only the worker thread gets here
            import xgrammar as xgr

            info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
            self._utf8 = Utf8Guard(info.decoded_vocab, self.num_words)
            # One thread: the machine's cores run the model; the manager keeps its own LRU.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                   ) -> xgrammar.TokenizerInfo:
    """xgrammar's view of the tokenizer: each id's token string as tokenizer.json spells it
    (byte-level, byte-fallback or raw, which xgrammar reads off the tokenizer.json), padded to the
    model's vocabulary. What xgrammar's from_huggingface does, without transformers."""
    import xgrammar as xgr

    encoded = [""] * vocab_size
    special = tokenizer.special_token_ids()
    for token, i in tokenizer.vocab().items():
        # A special token (<|im_start|>) is no text: spelled "", xgrammar never allows it
        # inside the output (the detokenizer would drop it); EOS comes in as a stop token.
        if i < vocab_size and i not in special:
            encoded[i] = token
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_json())
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=sorted(stop_token_ids), add_prefix_space=meta["add_prefix_space"])


# -- the sampler's side ---------------------------------------------------------------------------
_BYTE_BITS: dict[torch.device, Tensor] = {}


def _byte_bits(device: torch.device) -> Tensor:
    """[256, 8] float32: for each byte value, 0 at its set bits and -inf at its clear ones."""
    table = _BYTE_BITS.get(device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = torch.where(bits.bool(), 0.0, float("-inf")).to(device)
        _BYTE_BITS[device] = table
    return table


def apply_token_mask(logits: Tensor, mask: TokenMask) -> Tensor:
    """Set the logits [B, V] of the masked rows' disallowed tokens to -inf (in place; returns
    `logits`). The bitmask unpacks through a byte → 8 additive biases lookup (an embedding),
    7x faster on CPU than xgrammar's own kernel at batch 16 x 151k (bench/grammar_mask.py);
    int32 words are read as little-endian bytes, as CPUs and GPUs store them."""
    B, V = logits.shape
    bitmask = mask.bitmask.to(logits.device, non_blocking=True)
    r = bitmask.shape[0]
    codes = bitmask.view(torch.uint8).view(r, -1).int()  # [r, 4W]
    bias = torch.nn.functional.embedding(codes, _byte_bits(logits.device)).view(r, -1)  # [r, 32W]
    if bias.shape[1] < V:  # the mask covers the model's vocabulary; anything past it is refused
        raise ValueError(f"token mask covers {bias.shape[1]} tokens, the logits {V}")
    bias = bias[:, :V].to(logits.dtype)
    if len(mask.rows) == B and mask.rows == tuple(range(B)):
        logits += bias
    else:
        index = torch.tensor(mask.rows, dtype=torch.long, device=logits.device)
        logits.index_add_(0, index, bias)
    return logits
