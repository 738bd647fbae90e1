"""RequestMoves: the part of LLMEngine that moves a request between engines. A request
prefilled here leaves as a RequestState (its GDN states, its K/V and what it generated); one
prefilled elsewhere comes in from its RequestState into a free slot and fresh blocks; and its
tokens so far are replayed through the grammar, detokenizer and thinking budget, as a resumed
request's are (LLMEngine.add_request with resume_token_ids)."""

from qwen35_ray.engine.errors import RequestError
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sequence import Sequence
from qwen35_ray.engine.spec_accept import draft_mode
from qwen35_ray.engine.step_plan import forced_token


class TokenOutsideGrammar(RuntimeError):
    pass


class RequestMoves:
    """Mixed into LLMEngine: uses its executor, scheduler, cache manager and request table."""

    def _export(self, seq: Sequence) -> RequestState:
        tensors = self.executor.read_state(seq.slot, seq.block_table, seq.num_computed)
        state = RequestState(
            seq.request_id,
            self.fingerprint,
            list(seq.prompt_token_ids),
            list(seq.output_token_ids),
            seq.num_computed,
            seq.params,
            tensors,
            seq.seed,
            self._requests[seq.request_id][0],
            list(seq.output_logprobs),
            seq.rope_delta,
            # a sampled request's drafts are not sent: without the distributions they were
            # drawn from, the importer could not keep them exactly
            list(seq.drafts) if seq.draft_probs is None else [],
        )
        self.scheduler.remove(seq)
        return state

    def check_import(self, state: RequestState) -> None:
        """Raise ValueError for a state this engine can never continue."""
        state.check(self.config, self.dtype, self.fingerprint)
        if state.num_computed + 1 > self.max_model_len:
            raise ValueError(
                f"request {state.request_id!r} has {state.num_computed + 1} tokens; the "
                f"context here is {self.max_model_len}"
            )

    def can_import(self, state: RequestState) -> bool:
        """A free state slot and KV blocks for an imported request's tokens are available."""
        cm = self.cache_manager
        # with speculative decoding, room for a verify and the head's drafts past the tokens
        tokens = state.num_computed + 1 + 2 * self.scheduler.spec_k
        blocks = -(-tokens // cm.block_size)
        return cm.slots.num_free > 0 and blocks <= cm.blocks.num_free

    def import_request(self, state: RequestState) -> None:
        """Continue a request another engine prefilled: its states and K/V go into a free slot
        and fresh blocks, and it joins the running batch at its next decode step."""
        self.check_import(state)
        if state.request_id in self._requests:
            raise ValueError(f"request id {state.request_id!r} is already in use")
        seq = self._sequence(state.request_id, 0, state.prompt_token_ids, state.params, state.seed)
        try:
            # grammar, detokenizer and thinking budget are rebuilt from the tokens it generated
            self._replay(seq, state.output_token_ids, state.output_logprobs, "output_token_ids")
            seq.num_computed = state.num_computed
            seq.rope_delta = state.rope_delta
            if draft_mode(seq.params) == "greedy" and self.speculative is not None:
                # an argmax draft is kept only where it is the main model's: exact as it is
                seq.drafts = state.drafts[: self.speculative.k]
            self.scheduler.add_running(seq)
            self.executor.write_state(seq.slot, seq.block_table, state.tensors)
        except Exception:
            # the slot and blocks add_running took go back
            self.scheduler.remove(seq)
            self._detok.pop(id(seq))
            raise
        self._requests[state.request_id] = (state.prompt, list(state.prompt_token_ids), [seq])

    def _replay(self, seq: Sequence, tokens: list[int], logprobs: list[dict], what: str) -> None:
        """Walk seq through `tokens` sampled elsewhere as if it had sampled them here: its
        grammar, detokenizer, thinking budget, text and stop checks see each in turn.
        RequestError when a token could not have been sampled here, or would already have
        ended the request. `what` names the tokens in the message."""
        for i, token in enumerate(tokens):
            at = f"{what}[{i}]={token}"
            # the thinking budget is read (and made) where sampling this token read it
            forced = forced_token(seq, self.think)
            if forced is not None and token != forced:
                raise RequestError(
                    f"{at} is not the </think> that thinking_token_budget="
                    f"{seq.params.thinking_token_budget} forces there; resume from the tokens "
                    "this request generated"
                )
            try:
                self._append(seq, token, logprobs[i] if logprobs else None)
            except TokenOutsideGrammar as e:
                raise RequestError(f"{at} does not follow the request's grammar") from e
            if seq.is_finished:
                raise RequestError(
                    f"{at} already ends the request (finish_reason {seq.finish_reason!r}); "
                    "a finished request has nothing to resume"
                )
