"""Expert predictors for prefetch: which experts will layer l+1 (or the next token's layer 0) use?

Each predictor sees the routing of one step (one forward call at one layer, see trace.Step) through
`observe(layer, experts_per_token, weights_per_token)`; `scores(layer)` estimates, for every expert of
the *next* layer (layer+1, or layer 0 of the next token after the last layer), the probability that a
token chooses it, and `predict(layer, k, min_prob)` keeps the k best above min_prob.
- none:     predicts nothing.
- affinity: inter-layer affinity learned online: P(b at l+1 | a at l) from counts over the same token;
            the score of b is sum_a w_a P(b | a) (w: the token's router weights, normalised).
- temporal: the experts the previous token used at the next layer, scored by the learned rate at which
            that layer's experts are chosen again by the following token.
- hybrid:   both, combined as a noisy-or (1 - (1 - p_affinity)(1 - p_temporal)).
Lookahead gating (apply layer l+1's router to layer l's hidden state) needs real hidden states, so it
is a function for the engine (`lookahead_experts`) rather than a trace predictor; the same holds for
models with a pre-attention router (`PreAttentionRouterHook`). A wrong prediction costs bandwidth,
never correctness: predictors only choose what to read early.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

PREFETCHERS = ("none", "affinity", "temporal", "hybrid")
# Prefetch only experts more likely than this to be used: on the Mixtral traces 0.3 keeps hit rates
# within a few % of prefetching everything predicted while reading far fewer bytes (docs/tiers.md).
DEFAULT_MIN_PROB = 0.3


class Predictor:
    name = "none"

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts

    def reset(self) -> None:
        """A new request starts: forget per-sequence state (learned statistics stay)."""

    def observe(self, layer: int, experts: Sequence[Sequence[int]], weights: Sequence[Sequence[float]]) -> None:
        pass

    def scores(self, layer: int) -> np.ndarray | None:
        return None

    def predict(self, layer: int, k: int, min_prob: float = 0.0,
                skip: Callable[[int], bool] | None = None) -> list[int]:
        """Up to k experts for the next layer, best first, whose estimated probability of being chosen
        is > min_prob; experts for which skip(e) is true (already resident) are passed over."""
        s = self.scores(layer)
        if s is None or k <= 0:
            return []
        out = []
        for e in np.argsort(-s, kind="stable"):
            if s[e] <= max(min_prob, 0.0) or len(out) >= k:
                break
            if skip is None or not skip(int(e)):
                out.append(int(e))
        return out

    def next_layer(self, layer: int) -> int:
        return (layer + 1) % self.num_layers


class AffinityPredictor(Predictor):
    name = "affinity"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.counts = np.zeros((num_layers, num_experts, num_experts))  # [L, E, E] a at l -> b at l+1
        self.seen = np.zeros((num_layers, num_experts))  # [L, E] tokens with a at l (and l+1 observed)
        self._last: tuple[int, list[list[int]], list[list[float]]] | None = None

    def reset(self) -> None:
        self._last = None

    def observe(self, layer, experts, weights) -> None:
        last = self._last
        if last is not None and last[0] == layer - 1 and len(last[1]) == len(experts):
            c, seen = self.counts[layer - 1], self.seen[layer - 1]
            for prev, cur in zip(last[1], experts):
                for a in prev:
                    c[a, list(cur)] += 1.0
                    seen[a] += 1.0
        self._last = (layer, [list(e) for e in experts], [list(w) for w in weights])

    def scores(self, layer: int) -> np.ndarray | None:
        last = self._last
        if last is None or last[0] != layer or layer + 1 >= self.num_layers:
            return None
        seen = self.seen[layer][:, None]  # [E, 1]
        cond = np.divide(self.counts[layer], seen, out=np.zeros_like(self.counts[layer]), where=seen > 0)
        s = np.zeros(self.num_experts)  # P(b chosen at l+1), averaged over tokens, w-weighted over a
        for ex, ws in zip(last[1], last[2]):
            tw = sum(ws) or 1.0
            for a, w in zip(ex, ws):
                s += (w / tw) * cond[a]
        return s / max(len(last[1]), 1)


class TemporalPredictor(Predictor):
    name = "temporal"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.prev_token: dict[int, list[int]] = {}  # layer -> experts of the previous token there
        self.reused = np.ones(num_layers)  # [L] learned P(an expert of token t is chosen again at t+1)
        self.offered = np.full(num_layers, 2.0)  # [L]; the 1/2 prior keeps early predictions moderate

    def reset(self) -> None:
        self.prev_token.clear()

    def observe(self, layer, experts, weights) -> None:
        prev = self.prev_token.get(layer)
        if prev is not None and len(experts) == 1:
            self.reused[layer] += len(set(prev) & set(experts[0]))
            self.offered[layer] += len(prev)
        self.prev_token[layer] = list(experts[-1])  # the last token of the step is "the previous token"

    def scores(self, layer: int) -> np.ndarray | None:
        nxt = self.next_layer(layer)
        prev = self.prev_token.get(nxt)
        if prev is None:
            return None
        s = np.zeros(self.num_experts)
        s[prev] = self.reused[nxt] / self.offered[nxt]
        return s


class HybridPredictor(Predictor):
    name = "hybrid"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.parts = [AffinityPredictor(num_layers, num_experts), TemporalPredictor(num_layers, num_experts)]

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def observe(self, layer, experts, weights) -> None:
        for p in self.parts:
            p.observe(layer, experts, weights)

    def scores(self, layer: int) -> np.ndarray | None:
        miss = None  # noisy-or: P(chosen) = 1 - prod(1 - p_i)
        for p in self.parts:
            s = p.scores(layer)
            if s is not None:
                miss = (1.0 - s) if miss is None else miss * (1.0 - s)
        return None if miss is None else 1.0 - miss


def make_predictor(name: str, num_layers: int, num_experts: int) -> Predictor:
    from strata.errors import StrataError

    table = {"none": Predictor, "affinity": AffinityPredictor, "temporal": TemporalPredictor,
             "hybrid": HybridPredictor}
    if name not in table:
        raise StrataError(f"unknown prefetcher {name!r}: expected one of {', '.join(PREFETCHERS)}")
    return table[name](num_layers, num_experts)


def lookahead_experts(router_weight: torch.Tensor, hidden: torch.Tensor, top_k: int,
                      limit: int | None = None) -> list[int]:
    """Speculative gating (mixtral-offloading): layer l+1's router applied to layer l's hidden state.

    router_weight [E, H], hidden [T, H]. Returns the union of the tokens' predicted top-k experts,
    ranked by summed probability, at most `limit` (default top_k; for one decode token: its top-k).
    """
    logits = hidden.to(router_weight.dtype) @ router_weight.t()  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # [T, k]
    score = torch.zeros(probs.shape[-1]).index_add_(0, top_i.reshape(-1), top_p.reshape(-1))  # [E]
    order = torch.argsort(score, descending=True, stable=True)[: limit or top_k]
    return [int(e) for e in order if score[e] > 0]


class PreAttentionRouterHook:
    """For models whose router reads the pre-attention hidden state (SmallThinker): the layer's experts
    are known before attention runs, so reading them can overlap attention.

    `router_weight(layer)` gives that layer's router [E, H]; `prefetch(layer, experts)` starts the reads.
    The model calls the hook with the hidden state entering layer `layer`'s attention.
    """

    def __init__(self, router_weight: Callable[[int], torch.Tensor],
                 prefetch: Callable[[int, list[int]], None], k: int):
        self.router_weight, self.prefetch, self.k = router_weight, prefetch, k

    def __call__(self, layer: int, hidden: torch.Tensor) -> list[int]:
        experts = lookahead_experts(self.router_weight(layer), hidden.reshape(-1, hidden.shape[-1]), self.k)
        self.prefetch(layer, experts)
        return experts
