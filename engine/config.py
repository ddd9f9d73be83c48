"""The engine's settings (ray_config.yaml's `engine`), and what every layer's settings share:
checked when read, frozen afterwards, errors naming the key path and the value."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class NextserveConfigError(ValueError):
    """A config file nextserve cannot run with; the message names the key and the value."""


class Settings(BaseModel):
    """A frozen block of settings that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineLimits(Settings):
    max_num_seqs: int = Field(16, ge=1, description="sequence slots: most sequences in flight")
    max_model_len: int | None = Field(None, ge=1,
                                      description="tokens per sequence (default: min(model's, 4096))")
    max_num_batched_tokens: int = Field(2048, ge=1, description="most tokens in one engine step")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block (the unit the engine hands "
                                                  "out to sequences)")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks per attention layer (default: max_num_seqs × ceil("
                                "max_model_len / block_size), so no sequence is ever preempted); fewer "
                                "blocks hold less memory, and sequences are preempted and recomputed "
                                "when they run out")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks and DeltaNet states of earlier requests' prefixes (a shared "
                          "system prompt, a chat's earlier turns) instead of computing them again "
                          "(engine/prefix_cache.py); the outputs are those without it, within the float "
                          "rounding of a different chunking")
    prefix_cache_states: int = Field(
        32, ge=0, description="saved DeltaNet states (conv + recurrent state of every DeltaNet layer, "
                              "per entry e.g. ~74 MiB for Qwen3-Next-80B, ~0.02 MiB for the tiny model) "
                              "kept for prefix caching, evicted least recently used; a hybrid model's "
                              "prefix is reused only where a state was saved at its end (0: never)")
    prefix_cache_state_interval: int = Field(
        32, ge=1, description="KV-cache blocks between the DeltaNet states saved along a prompt (prefill "
                              "chunks end there): a request sharing a prefix with an earlier one resumes "
                              "at the last such point inside it; smaller: closer hits, more saves and "
                              "shorter chunks")
    speculative_tokens: int = Field(
        0, ge=0, le=8, description="MTP speculative decoding: draft tokens per sequence and step from the "
                                   "checkpoint's multi-token-prediction layer (Qwen3-Next's mtp.*), verified "
                                   "by one target step of k+1 tokens; greedy output is unchanged, sampled "
                                   "output keeps its distribution (rejection sampling); 0: off")
    engine_process: Literal["auto", "inline", "separate"] = Field(
        "auto", description="where a serving replica runs the engine loop: `separate`, an engine core "
                            "process of its own (engine/core.py), which shares no GIL with HTTP, "
                            "tokenizing and streaming (faster under load, README: Serving; local "
                            "executor only); `inline`, a thread of the replica's process; `auto`: "
                            "separate with the local executor, inline with the cluster executor (whose "
                            "compute is in its actors)")
    compile: bool = Field(
        False, description="run decode steps through torch.compile'd layers (3-6x faster steps on small "
                           "models), one graph per batch-size bucket; needs a C++ compiler at run time; "
                           "other steps stay eager. Local executor: a serving replica compiles the buckets "
                           "in a background thread of its engine and runs those steps eagerly until each "
                           "bucket is ready (logged with its seconds; tens of seconds or more per bucket on "
                           "a small CPU, seconds with inductor's on-disk cache), `generate` compiles a "
                           "bucket on its first step. Cluster executor: every actor compiles the layers "
                           "or routed experts it holds, a new bucket on every actor before its first step")
