"""Slow, obviously-correct reference decoders written from spec sections 3, 4 and 5.1.

They run transformers' ``Ministral3ForCausalLM`` over the *whole* sequence at every forward,
with an explicit 4D additive mask (0 / -inf) and no cache reuse: prefix rows are causal,
block rows see the prefix and every block row (spec 2.2). Greedy only (temperature 0), one
prompt at a time; the mask id is never a candidate (spec 9.8 c). They return the generated
ids (stop token excluded) and the number of forwards, prefill included.
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def mask_4d(prefix: int, block: int, bidirectional: bool) -> torch.Tensor:
    """Additive mask ``[1, 1, n, n]`` for ``prefix`` causal rows then ``block`` rows."""
    n = prefix + block
    allowed = torch.ones(n, n).tril().bool()
    if bidirectional:
        allowed[prefix:, prefix:] = True
    return torch.zeros(n, n).masked_fill(~allowed, NEG)[None, None]


@torch.no_grad()
def logits_of(oracle, ids: list[int], block: int = 0, bidirectional: bool = False) -> torch.Tensor:
    """fp32 logits ``[n, V]`` of ``ids`` whose last ``block`` tokens form the current block."""
    x = torch.tensor([ids])
    mask = mask_4d(len(ids) - block, block, bidirectional)
    return oracle(input_ids=x, attention_mask=mask, position_ids=torch.arange(len(ids))[None]).logits[0].float()


def argmax_no_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    z = logits.clone()
    z[..., mask_id] = NEG
    return z.argmax(-1)


def ref_ar(oracle, prompt: list[int], max_tokens: int, eos: set[int], mask_id: int):
    out: list[int] = []
    nfe = 0
    while len(out) < max_tokens:
        tok = int(argmax_no_mask(logits_of(oracle, prompt + out)[-1], mask_id))
        nfe += 1
        if tok in eos:
            break
        out.append(tok)
    return out, nfe


def ref_diffusion(oracle, prompt: list[int], max_tokens: int, block_length: int,
                  threshold: float | None, eos: set[int], mask_id: int,
                  unmask: str = "confidence", steps: int | None = None, seed: int = 0):
    """Spec 3.2/3.3 with B = block_length and ``steps`` passes per block (None: B); run over
    ceil(max_tokens / B) blocks and truncated to max_tokens and the first EOS. Masked slots
    are unmasked in the order of ``unmask`` (``ref_priority``): each pass takes its quota of
    the even split (at least one; one when a threshold is given without steps) plus every
    slot whose confidence reaches the threshold. Forwards: prefill + denoise + commits that
    were needed to produce a next seed."""
    seed_tok = int(argmax_no_mask(logits_of(oracle, prompt)[-1], mask_id))
    nfe = 1
    out: list[int] = []
    while True:
        block = [seed_tok] + [mask_id] * (block_length - 1)
        limit = min(block_length, max_tokens - len(out))
        quotas = _even(block_length - 1, steps or block_length)
        step = 0
        while True:
            first_mask = block.index(mask_id) if mask_id in block else block_length
            stops = [i for i in range(first_mask) if block[i] in eos]
            if (stops and stops[0] < limit) or first_mask >= limit:
                break
            z = logits_of(oracle, prompt + out + block, block_length, bidirectional=True)[-block_length:]
            nfe += 1
            cand = argmax_no_mask(z, mask_id)
            conf = torch.softmax(z, -1).gather(-1, cand[:, None])[:, 0]
            masked = torch.tensor([t == mask_id for t in block])
            n_masked = int(masked.sum())
            score = ref_priority(unmask, z, conf, mask_id, seed, len(out)).masked_fill(~masked, NEG)
            conf = conf.masked_fill(~masked, NEG)
            quota = quotas[min(step, len(quotas) - 1)]
            k = min(max(1 if threshold is not None and steps is None else quota, 1), n_masked)
            if threshold is None:
                chosen = torch.topk(score, k).indices.tolist()
            else:
                order = torch.topk(score, n_masked).indices.tolist()
                chosen = order[:k] + [i for i in order[k:] if float(conf[i]) >= threshold]
            for i in chosen:
                block[i] = int(cand[i])
            step += 1
        for tok in block[:limit]:
            if tok in eos:
                return out, nfe
            out.append(tok)
        if len(out) >= max_tokens:
            return out, nfe
        seed_tok = int(argmax_no_mask(logits_of(oracle, prompt + out)[-1], mask_id))
        nfe += 1


def ref_priority(unmask: str, z: torch.Tensor, conf: torch.Tensor, mask_id: int, seed: int,
                 offset: int) -> torch.Tensor:
    """Each block slot's priority under an unmasking policy (higher first), one slot at a time:
    confidence softmax(z)[cand] (fp32); margin p1 - p2 of softmax(z) among non-mask ids;
    entropy -H(softmax(z)); random the uniform keyed (seed, offset + slot, rng.UNMASK);
    leftmost -slot."""
    if unmask == "confidence":
        return conf
    values = []
    for i in range(len(z)):
        p = torch.softmax(z[i], -1)
        if unmask == "margin":
            ranked = sorted((float(v), j) for j, v in enumerate(p.tolist()) if j != mask_id)
            v = torch.tensor(ranked[-1][0], dtype=torch.float32) - torch.tensor(ranked[-2][0], dtype=torch.float32)
        elif unmask == "entropy":
            v = -torch.special.entr(p).sum()
        elif unmask == "random":
            from trimode.decoding import rng
            key = rng.key(torch.tensor(seed), torch.tensor(offset + i), rng.UNMASK)
            v = rng.uniform(key, 1)[0]
        elif unmask == "leftmost":
            v = torch.tensor(-float(i))
        else:
            raise ValueError(unmask)
        values.append(float(v))
    return torch.tensor(values, dtype=torch.float64)


def ref_linear_spec(oracle, prompt: list[int], max_tokens: int, block_length: int,
                    eos: set[int], mask_id: int):
    """Spec 5.1 (threshold 0): one draft pass and one verify pass per cycle; exact match.
    Draft slot 1 is the causal (ar) argmax after the seed (trimode's draft forward computes
    it from a causal, adapter-off copy of the seed); slots 2.. come from the bidirectional
    pass."""
    seed = int(argmax_no_mask(logits_of(oracle, prompt)[-1], mask_id))
    nfe, out = 1, [seed]
    while len(out) < max_tokens and not (set(out) & eos):
        context = prompt + out[:-1]
        block = [seed] + [mask_id] * (block_length - 1)
        if block_length > 1:
            z = logits_of(oracle, context + block, block_length, bidirectional=True)[-block_length:]
            nfe += 1
            block = [seed] + argmax_no_mask(z, mask_id)[1:].tolist()
            block[1] = int(argmax_no_mask(logits_of(oracle, context + [seed])[-1:], mask_id)[0])
        a = argmax_no_mask(logits_of(oracle, context + block)[-block_length:], mask_id).tolist()
        nfe += 1
        c = 0
        while c < block_length - 1 and a[c] == block[c + 1]:
            c += 1
        out += a[: c + 1]
        seed = a[c]
    trimmed: list[int] = []
    for tok in out[:max_tokens]:
        if tok in eos:
            break
        trimmed.append(tok)
    return trimmed, nfe


def _even(masks: int, steps: int) -> list[int]:
    base, extra = divmod(masks, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]
