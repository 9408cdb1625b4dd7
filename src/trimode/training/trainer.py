"""``trimode train``: fine-tune a checkpoint with the joint AR + diffusion objective.

Full parameters (saved as a checkpoint directory) or a LoRA draft adapter on the noisy
stream only (saved in PEFT format, used by linear_spec drafts, quadratic_spec draft tokens
and, with ``denoise``, diffusion denoising). AdamW with linear warmup and cosine decay,
gradient accumulation and clipping; a rich progress bar with both loss components and
tokens/s; periodic held-out evaluation (AR loss, diffusion loss, tokens_per_forward,
acceptance_length); resumable, bit-identically, from ``OUT/checkpoint.pt``. Every random
draw is derived from ``seed`` and the micro-step index, never from global RNG state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import Example, Rows, load_examples, make_rows
from .objective import block_loss, joint_loss

METHODS = ("full", "draft_lora")
TARGETS = ("data", "teacher")
# settings a resume may change: what a run reports, how often it saves, how long it runs
RESUME_MAY_CHANGE = {"progress", "eval_every", "eval_prompts", "eval_max_tokens", "save_every",
                     "steps"}  # a longer run continues (its schedule is that of the new steps)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run (saved with its checkpoints). Raises ValueError naming the field."""

    data: tuple[str, ...]
    out: str
    model: str | None = None
    method: str = "draft_lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    denoise: bool = True
    targets: str = "data"
    block_length: int = 8
    alpha: float = 0.3
    eps: float = 1e-3
    draft_layout_rate: float = 0.0
    draft_blocks: int = 0
    denoise_layout_rate: float = 0.3
    masked_layout_rate: float = 0.2
    kl_weight: float = 0.5
    certainty_weight: float = 0.0
    init_adapter: str | None = None
    seq_length: int = 256
    pack: bool = True
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int = 0
    eval_prompts: int = 4
    eval_max_tokens: int = 32
    save_every: int = 0
    progress: bool = True

    def __post_init__(self):
        checks = [
            ("method", self.method in METHODS, f"one of {', '.join(METHODS)}"),
            ("targets", self.targets in TARGETS, f"one of {', '.join(TARGETS)}"),
            ("lora_rank", self.method != "draft_lora" or self.lora_rank >= 1, "an integer >= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("seq_length", self.seq_length >= 2, "an integer >= 2"),
            ("block_length", 1 <= self.block_length <= self.seq_length,
             f"in [1, seq_length={self.seq_length}]"),
            ("alpha", self.alpha >= 0 and math.isfinite(self.alpha), ">= 0"),
            ("eps", 0 < self.eps < 1, "in (0, 1)"),
            ("draft_layout_rate", 0 <= self.draft_layout_rate <= 1, "in [0, 1]"),
            ("draft_blocks", self.draft_blocks >= 0,
             "an integer >= 0 (0: aligned dual-stream noising)"),
            ("draft_blocks", self.draft_blocks == 0 or self.method == "draft_lora",
             "0 with --method full (sampled blocks train a draft adapter)"),
            ("draft_blocks", self.draft_blocks == 0 or self.block_length >= 2,
             "0 when block_length is 1 (a block needs a seed and a masked slot)"),
            ("denoise_layout_rate", 0 <= self.denoise_layout_rate <= 1, "in [0, 1]"),
            ("masked_layout_rate", 0 <= self.masked_layout_rate <= 1, "in [0, 1]"),
            ("draft_layout_rate", self.draft_blocks == 0 or self.draft_layout_rate
             + self.denoise_layout_rate + self.masked_layout_rate > 0,
             "> 0 when draft, denoise and masked layout rates are all 0"),
            ("kl_weight", 0 <= self.kl_weight <= 1, "in [0, 1]"),
            ("certainty_weight", 0 <= self.certainty_weight <= 10
             and (self.certainty_weight == 0 or self.draft_blocks > 0),
             "in [0, 10], and 0 unless draft_blocks > 0 (it weighs the sampled-block loss)"),
            ("init_adapter", self.init_adapter is None or self.method == "draft_lora",
             "unset with method full (it warm-starts a draft_lora adapter)"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("grad_accum", self.grad_accum >= 1, "an integer >= 1"),
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
            ("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)"),
            ("eval_every", self.eval_every >= 0, "an integer >= 0 (0: only at the end)"),
            ("save_every", self.save_every >= 0, "an integer >= 0 (0: only at the end)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}; got {getattr(self, name)!r}")


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup to 1, then cosine decay to ``floor`` at ``total`` (step is 0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Owns the model, data rows, optimizer and schedule of one run."""

    def __init__(self, config: TrainConfig):
        from ..checkpoint.loader import load_model
        from ..checkpoint.tokenizer import Tokenizer

        self.config = c = config
        self.out = Path(c.out)
        model_path = c.model
        if model_path is None:
            from ..checkpoint.embedded import default_model_dir

            model_path = default_model_dir(progress=c.progress)
        self.model_path = str(model_path)
        self.model, self.ckpt = load_model(model_path, dtype=torch.float32)
        mc = self.model.config
        if mc.mask_token_id is None:
            raise ValueError(f"model: {model_path} has no mask_token_id in its config")
        self.tokenizer = Tokenizer.load(self.ckpt.directory, self.ckpt.gguf_file,
                                        mc.mask_token_id, mc.bos_token_id)
        examples = load_examples(list(c.data), self.tokenizer)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(c.seed))
        examples = [examples[i] for i in order.tolist()]
        n_eval = int(len(examples) * c.eval_fraction)
        self.eval_examples: list[Example] = examples[:n_eval]
        pad = mc.eos_token_ids[0] if mc.eos_token_ids else 0
        self.rows: Rows = make_rows(examples[n_eval:], c.seq_length, c.pack, pad)
        self.eval_rows: Rows | None = (make_rows(self.eval_examples, c.seq_length, c.pack, pad)
                                       if self.eval_examples else None)
        self.params = self._trainable()
        decay = [p for p in self.params if p.dim() >= 2]
        rest = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=c.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, c.warmup_steps, c.steps, c.min_lr_ratio))
        self.step = 0
        self._perms: dict[int, list[int]] = {}

    def _trainable(self) -> list[torch.nn.Parameter]:
        c = self.config
        if c.method == "draft_lora":
            from .lora import attach_lora

            params = attach_lora(self.model, c.lora_rank, c.lora_alpha, c.seed)
            if c.init_adapter is not None:
                from .lora import init_from_adapter

                init_from_adapter(self.model, Path(c.init_adapter), c.lora_rank, c.lora_alpha)
            return params
        self.model.train()
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- data order: a fixed permutation per epoch, derived from the seed ------------------
    def _row_indices(self, micro: int) -> list[int]:
        n, bs = len(self.rows), self.config.batch_size
        out = []
        for g in range(micro * bs, micro * bs + bs):
            epoch = g // n
            if epoch not in self._perms:
                gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch + 1)
                self._perms = {epoch: torch.randperm(n, generator=gen).tolist()}
            out.append(self._perms[epoch][g % n])
        return out

    def _loss(self, rows: Rows, idx: list[int], generator: torch.Generator):
        c = self.config
        if c.draft_blocks:
            return block_loss(self.model, rows.tokens[idx], rows.valid[idx], rows.loss[idx],
                              generator, block_length=c.block_length, blocks=c.draft_blocks,
                              layout_rates=(c.draft_layout_rate, c.denoise_layout_rate,
                                            c.masked_layout_rate),
                              eps=c.eps, kl_weight=c.kl_weight,
                              certainty_weight=c.certainty_weight)
        return joint_loss(self.model, rows.tokens[idx], rows.valid[idx], rows.loss[idx],
                          generator, block_length=c.block_length, alpha=c.alpha, eps=c.eps,
                          draft_adapter=c.method == "draft_lora", targets=c.targets,
                          draft_layout_rate=c.draft_layout_rate)

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns its statistics."""
        c = self.config
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        ar = [0.0, 0]
        diff = [0.0, 0]
        tokens = 0
        for k in range(c.grad_accum):
            micro = self.step * c.grad_accum + k
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + 7919 * (micro + 1))
            idx = self._row_indices(micro)
            parts = self._loss(self.rows, idx, gen)
            if parts.total.requires_grad:  # a draft row can have no scored target at all
                (parts.total / c.grad_accum).backward()
            ar = [ar[0] + parts.ar_sum, ar[1] + parts.ar_count]
            diff = [diff[0] + parts.diff_sum, diff[1] + parts.diff_count]
            tokens += int(self.rows.valid[idx].sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - start
        return {"step": self.step, "ar_loss": ar[0] / max(ar[1], 1),
                "diff_loss": diff[0] / max(diff[1], 1), "diff_targets": diff[1],
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / seconds, "seconds": seconds}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out AR loss and diffusion CE (fixed noise seed), and tokens_per_forward
        (diffusion, threshold 0.9) and acceptance_length (linear_spec) on held-out prompts."""
        from .evaluate import decode_metrics

        c = self.config
        out: dict = {"step": self.step}
        if self.eval_rows is not None:
            gen = torch.Generator().manual_seed(c.seed + 12345)
            ar, diff = [0.0, 0], [0.0, 0]
            for k in range(len(self.eval_rows)):
                parts = self._loss(self.eval_rows, [k], gen)
                ar = [ar[0] + parts.ar_sum, ar[1] + parts.ar_count]
                diff = [diff[0] + parts.diff_sum, diff[1] + parts.diff_count]
            out.update(eval_ar_loss=ar[0] / max(ar[1], 1), eval_diff_loss=diff[0] / max(diff[1], 1))
            prompts = [e.prompt for e in self.eval_examples[: c.eval_prompts]]
            out.update(decode_metrics(self.model, prompts, c.block_length, c.eval_max_tokens,
                                      denoise_adapter=c.method == "draft_lora" and c.denoise))
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "params": [p.detach().clone() for p in self.params],
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "config": asdict(self.config)}

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoint.pt"
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.state(), str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        return path

    def resume(self) -> bool:
        """Load ``OUT/checkpoint.pt`` if present; returns whether it did."""
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return False
        state = torch.load(path, weights_only=True)
        saved, now = state.get("config", {}), asdict(self.config)
        plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE
                   and plain(saved[k]) != plain(now[k])]
        if changed:
            diffs = ", ".join(f"{k}={saved[k]!r} there, {now[k]!r} here" for k in changed)
            raise ValueError(f"resume: {path} was trained with other settings ({diffs}); "
                             "rerun with its settings, or start over with --no-resume "
                             "(resume=False) or another --out")
        if len(state["params"]) != len(self.params):
            raise ValueError(f"resume: {path} holds {len(state['params'])} tensors; this run "
                             f"trains {len(self.params)} (different method or model)")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        return True

    def save_result(self) -> Path:
        """The trained weights: ``OUT/adapter`` (PEFT) or ``OUT/model`` (checkpoint dir)."""
        c = self.config
        if c.method == "draft_lora":
            from .lora import save_adapter

            return save_adapter(self.model, self.out / "adapter", c.lora_rank, c.lora_alpha,
                                c.denoise, base=c.model or "trimode:embedded/smollm2-135m-instruct")
        from safetensors.torch import save_file

        target = self.out / "model"
        target.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if self.model.config.tie_word_embeddings:
            state.pop("diffusion_head.weight", None)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        for f in Path(self.ckpt.directory).iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".gguf")) \
                    and f.name != "model.safetensors.index.json":
                shutil.copy(f, target / f.name)
        return target


def train(config: TrainConfig, resume: bool = True,
          stop_after: int | None = None) -> tuple[Trainer, list[dict]]:
    """Run ``config`` to ``config.steps`` (continuing a checkpoint when ``resume``), write
    ``OUT/train_log.jsonl`` and the result; returns the trainer and the log records.
    ``stop_after``: stop (and save) at that step, the schedule still that of ``steps``."""
    from .progress import TrainProgress

    trainer = Trainer(config)
    if resume:
        trainer.resume()
    log: list[dict] = []
    config_out = Path(config.out)
    config_out.mkdir(parents=True, exist_ok=True)
    with (config_out / "train_log.jsonl").open("a") as f, \
            TrainProgress(config.steps, trainer.step, config.progress) as bar:
        end = config.steps if stop_after is None else min(stop_after, config.steps)
        while trainer.step < end:
            record = trainer.train_step()
            bar.update(record)
            records = [record]
            step = trainer.step
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                records.append(trainer.evaluate())
                bar.note(records[-1])
            if config.save_every and step % config.save_every == 0:
                trainer.save_checkpoint()
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            log += records
        final = trainer.evaluate()
        bar.note(final)
        f.write(json.dumps({**final, "final": True}) + "\n")
        log.append(final)
    trainer.save_checkpoint()
    trainer.save_result()
    return trainer, log
