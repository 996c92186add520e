"""ModelDock's generation types in vLLM's terms and back: ``SamplingParams`` to ``vllm.SamplingParams`` (the field
names are vLLM's already, structured outputs included), and vLLM's per-position log-probabilities to
``TokenLogprobs``.

vLLM is asked for deltas (``RequestOutputKind.DELTA``), so each ``RequestOutput`` carries only what is new, which is
what a ``GenerationOutput`` chunk holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from server.errors import InvalidInput
from server.protocol.generation import Logprob, SamplingParams, TokenLogprobs


def vllm_sampling_params(sampling: SamplingParams, max_tokens: int) -> Any:
    """The ``vllm.SamplingParams`` of one request; vLLM's own checks become ``InvalidInput``."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    from server.structured_output.compiler import compact_json_grammar

    structured = None
    if sampling.structured_outputs is not None:
        # vLLM takes JSON's whitespace from its server-wide setting and ignores the request's flag: a request that
        # disables it sends the grammar ModelDock's own engine would use, so every engine answers alike.
        compact = compact_json_grammar(sampling.structured_outputs)
        fields = (
            {"grammar": compact}
            if compact is not None
            else sampling.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        )
        try:
            structured = StructuredOutputsParams(**fields)
        except ValueError as exc:
            raise InvalidInput(f"field 'structured_outputs': {exc}") from None
    try:
        return VllmSamplingParams(
            n=1,
            max_tokens=max_tokens,
            min_tokens=sampling.min_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop=list(sampling.stop),
            stop_token_ids=list(sampling.stop_token_ids),
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            ignore_eos=sampling.ignore_eos,
            logit_bias=dict(sampling.logit_bias) or None,
            logprobs=sampling.logprobs,
            prompt_logprobs=sampling.prompt_logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )
    except ValueError as exc:  # vLLM's own range checks (logit_bias ids, stop ids...)
        raise InvalidInput(f"sampling parameters: {exc}") from None


def token_logprobs(
    chosen: Iterable[int],
    positions: Iterable[Mapping[int, Any] | None],
    top: int,
    decode: Callable[[int], str],
) -> list[TokenLogprobs | None]:
    """One ``TokenLogprobs`` per position: the chosen token and the ``top`` most likely ones (vLLM's rank order).

    vLLM gives each position a dict of token id to ``vllm.logprobs.Logprob`` (log-probability, rank, decoded
    text) holding the top ones and the chosen one; a position without any (a prompt's first token) stays None.
    """
    result: list[TokenLogprobs | None] = []
    for token_id, entries in zip(chosen, positions, strict=True):
        if entries is None:
            result.append(None)
            continue
        chosen_entry = entries.get(token_id)
        if chosen_entry is None:
            result.append(None)
            continue
        ranked = sorted(
            ((tid, e) for tid, e in entries.items() if e.rank is not None and e.rank <= top), key=lambda p: p[1].rank
        )
        result.append(
            TokenLogprobs(
                chosen=_logprob(token_id, chosen_entry, decode),
                top=[_logprob(tid, entry, decode) for tid, entry in ranked],
            )
        )
    return result


def _logprob(token_id: int, entry: Any, decode: Callable[[int], str]) -> Logprob:
    text = entry.decoded_token if entry.decoded_token is not None else decode(token_id)
    return Logprob(token_id=token_id, token=text, logprob=float(entry.logprob))
